"""Atomic file writes: a crash or a full disk never leaves a half-written file under its final name.

Everything is written to a temporary sibling first and moved into place with `os.replace`, which is
atomic on POSIX within one filesystem. Readers therefore see either the old file or the new one, so a
write that fails can always be reported as one line saying what survived (`write_error`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lkspec.errors import LkspecError

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
RERUN = "rerun the same command to resume"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success move it into place, on error delete it."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes owner-only files; give the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())


ALIASES_KEY = "lkspec_aliases"  # safetensors metadata: {name: name it shares storage with}


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None, *, dedupe: bool = False) -> None:
    """safetensors refuses tensors that share storage: by default every tensor is written as its own copy
    (what other loaders expect); with `dedupe`, a tensor that *is* an earlier one (tied weights) is written
    once and recorded as an alias, which `load_tensors` restores."""
    flat: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    aliases: dict[str, str] = {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen and dedupe:
            aliases[k] = seen[key]
            continue
        flat[k] = v.detach().contiguous().clone() if key in seen else v.detach().contiguous()
        seen.setdefault(key, k)
    meta = dict(metadata or {})
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases)
    with atomic_path(path) as tmp:
        try:
            save_file(flat, str(tmp), metadata=meta or None)
        except SafetensorError as exc:  # the Rust writer's I/O errors are not OSError: make them one
            raise _as_os_error(exc, tmp) from None
        os.chmod(tmp, 0o666 & ~_umask())  # save_file recreates the file owner-only: give the usual mode back


def _as_os_error(exc: SafetensorError, path: Path | None) -> OSError:
    text = str(exc)
    code = next((e for e in DISK_FULL if f"os error {e})" in text), None)
    if code is None and "No space left" in text:
        code = errno.ENOSPC
    return OSError(code or errno.EIO, text, *([str(path)] if path is not None else []))


DAMAGED_FIX = "delete it and rerun the lkspec command that wrote it"


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike[str], fix: str = DAMAGED_FIX,
                     device: str | torch.device = "cpu") -> Iterator[Any]:
    """`safe_open` whose failure on a truncated or corrupt file is one line naming the file and the fix."""
    try:
        f = safe_open(str(path), framework="pt", device=str(device))
    except (SafetensorError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise LkspecError(f"{path} is missing; {fix}") from None
        raise LkspecError(f"{path} is truncated or corrupt ({exc}); {fix}") from None
    with f:
        yield f


def tensor_aliases(path: str | os.PathLike[str]) -> dict[str, str]:
    """The aliases `save_tensors(dedupe=True)` recorded in a file (empty for any other safetensors file)."""
    with open_safetensors(path) as f:
        return _aliases(f)


def _aliases(f: Any) -> dict[str, str]:
    meta = f.metadata() or {}
    return dict(json.loads(meta[ALIASES_KEY])) if ALIASES_KEY in meta else {}


def load_tensors(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                 fix: str = DAMAGED_FIX) -> dict[str, torch.Tensor]:
    with open_safetensors(path, fix, device) as f:  # a damaged file fails here, by name
        out = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        aliases = _aliases(f)
    for name, same in aliases.items():
        out[name] = out[same]
    return out


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place when complete."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes an owner-only directory
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_error(exc: OSError, doing: str, *, then: str = RERUN, full: str = "disk full") -> LkspecError:
    """The one-line error for a failed write: `doing` says what was written and what survived it.

    Every writer here is atomic, so earlier output is intact and the honest advice is always "free space
    and rerun"; a traceback from deep inside safetensors or Arrow would hide that.
    """
    reason = full if exc.errno in DISK_FULL else f"writing failed ({exc})"
    return LkspecError(f"{reason} while {doing}; free space and {then}")


def as_disk_full(exc: BaseException) -> LkspecError | None:
    """The one-line error for a full disk met by a writer with no message of its own (export, eval, the target
    conversion, transformers' and safetensors' own writers), else None.

    Every lkspec writer is atomic, so whatever finished before is intact and rerunning resumes; the line says
    where the disk filled and how much room is left there, because a traceback from the Rust writer does not.
    """
    if isinstance(exc, SafetensorError):
        exc = _as_os_error(exc, None)
    if not isinstance(exc, OSError) or exc.errno not in DISK_FULL:
        return None
    place = ""
    if exc.filename:  # name the folder the user chose, not the temporary file inside it
        parts = Path(exc.filename).parts
        cut = next((i for i, p in enumerate(parts) if p.startswith(".") and p.endswith(".tmp")), len(parts))
        where = Path(*parts[:cut])
        probe = next((p for p in (where, *where.parents) if p.exists()), where)
        place = f" writing to {where} ({shutil.disk_usage(probe).free / 2**20:,.0f} MiB free there)"
    return LkspecError(f"the disk is full{place}; what finished before is intact (lkspec writes atomically): free "
                       f"space or point the output elsewhere, and {RERUN}")


@contextlib.contextmanager
def disk_full_is_one_line(doing: str, kept: str, *, then: str = RERUN) -> Iterator[None]:
    """A full disk inside the block becomes `write_error`; every other OSError is a bug to see in full."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        raise write_error(exc, f"{doing}: {kept}", then=then) from None
