"""albor: pretrain the albor-370M code model under a strict training contract."""

__version__ = "0.1.0"
