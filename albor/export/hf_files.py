"""A Hugging Face ``LlamaForCausalLM`` directory, written without transformers (a test dependency only).

- ``config.json``: albor.model.hf_config_dict, the one albor -> HF mapping
  (tests/test_hf_parity.py checks it), plus the token ids and the dtype;
- ``model.safetensors``: the weights under their HF names; the tied head is
  left out, as ``save_pretrained`` does, and HF ties it again on load;
- ``generation_config.json``: the token ids ``generate`` needs;
- ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``:
  albor's own tokenizer (albor.data.tokenizer) as the tokenizers library
  serializes it, for ``PreTrainedTokenizerFast``.

Token ids: albor's tokenizer has one special token, ``<|endoftext|>``. It ends
every document of the training stream, so it is eos, and also bos (as in
GPT-2): every document but the first followed one. Without them in config.json,
LlamaConfig's defaults (bos 1, eos 2) would stop ``generate`` at an ordinary
byte token. It is registered as special, so ``decode(skip_special_tokens=True)``
drops it, but ``split_special_tokens`` keeps albor's encoding: the text
``<|endoftext|>`` inside a source file stays ordinary text, as it was in training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from tokenizers import AddedToken
from tokenizers import Tokenizer as TokenizersTokenizer

from albor.atomic_files import current_umask
from albor.data.tokenizer import EOS_TOKEN, Tokenizer
from albor.export.model_file import ModelFile
from albor.model import hf_config_dict

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
FILES = (CONFIG, GENERATION_CONFIG, WEIGHTS, TOKENIZER, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)


def write_hf_model(out: Path, model: ModelFile, tokenizer: Tokenizer) -> None:
    """Write every file of :data:`FILES` into the existing directory ``out``."""
    eos = tokenizer.eos_id
    ids = {"bos_token_id": eos, "eos_token_id": eos}
    # "dtype" is what from_pretrained(dtype="auto", transformers 5's default) loads in; 4.x loads float32 anyway.
    _write_json(out / CONFIG, {**hf_config_dict(model.config), **ids, "dtype": model.dtype_name})
    # pad = eos: batched generate pads finished rows with it, and says so on every call when it is unset.
    _write_json(out / GENERATION_CONFIG, {**ids, "pad_token_id": eos})
    save_file(model.weights, str(out / WEIGHTS), metadata={"format": "pt"})  # "pt": what from_pretrained expects
    os.chmod(out / WEIGHTS, 0o666 & ~current_umask())  # safetensors makes it 0600; exports are shared like runs
    (out / TOKENIZER).write_text(tokenizer_json(tokenizer), encoding="utf-8")
    _write_json(out / TOKENIZER_CONFIG, tokenizer_config(model.config.max_position_embeddings))
    _write_json(out / SPECIAL_TOKENS_MAP, {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN})


def tokenizer_json(tokenizer: Tokenizer) -> str:
    """albor's tokenizer, serialized, with ``<|endoftext|>`` registered as a special token."""
    backend = TokenizersTokenizer.from_str(tokenizer.backend.to_str())  # a copy: albor's own keeps no special token
    backend.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return backend.to_str(pretty=True) + "\n"


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """``tokenizer_config.json``: the generic fast tokenizer over tokenizer.json, with albor's conventions."""
    return {
        # The generic class takes tokenizer.json as written, in transformers 4 and 5 alike; without it,
        # model_type "llama" picks LlamaTokenizerFast, whose SentencePiece defaults add a bos to every text.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_bos_token": False,  # albor adds no token to a text; documents are separated in the data
        "add_eos_token": False,
        "split_special_tokens": True,  # a literal "<|endoftext|>" in a text stays text, as in albor.data.tokenizer
        "clean_up_tokenization_spaces": False,  # would rewrite code: "f(a , b)" decoded as "f(a, b)"
        "model_max_length": model_max_length,
        "model_input_names": ["input_ids", "attention_mask"],  # Llama takes no token_type_ids
    }


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    # Plain writes: the directory as a whole is put in place only once complete (albor.export_hf).
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
