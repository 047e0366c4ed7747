"""The albor model: config, presets, the Llama decoder, counts, and HF naming."""

from albor.model.config import PRESETS, ModelConfig, model_preset
from albor.model.counting import flops_per_token, non_embedding_parameters, num_parameters
from albor.model.hf_names import hf_config_dict, load_hf_state_dict, to_hf_state_dict
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
    "to_hf_state_dict",
]
