"""The albor model: config, presets, the Llama decoder, counts, and HF naming."""

from albor.model.config import PRESETS, ModelConfig, model_preset, padded_vocab_size
from albor.model.counting import flops_per_token, non_embedding_parameters, num_parameters
from albor.model.hf_names import hf_config_dict, load_hf_state_dict, padded_rows, real_rows, to_hf_state_dict
from albor.model.llama import AlborLlama

__all__ = [
    "PRESETS",
    "AlborLlama",
    "ModelConfig",
    "flops_per_token",
    "hf_config_dict",
    "load_hf_state_dict",
    "model_preset",
    "non_embedding_parameters",
    "num_parameters",
    "padded_rows",
    "padded_vocab_size",
    "real_rows",
    "to_hf_state_dict",
]
