"""Data: raw corpora, the tokenizer, token shards, the ``prepare-data`` command, dataset resolution, loaders.

Imports run one way: the library modules (corpus, split, shards, tokenizer,
tokenizing, staging) know nothing of the command (``prepare``) or of a run
(``resolve``, ``loader``). Only ``loader`` imports torch, so ``albor
prepare-data`` starts without it.
"""
