"""Trainer state on disk, without pickle: safetensors for tensors, JSON for the rest, each dir atomic.

RUN/trainer_state/ is the single source of truth for `--resume`; it is built under a temporary name and
renamed into place, so it is always one complete checkpoint:

    state.json              step, epoch, batches done in the epoch, best held-out tau, metrics.jsonl
                            length, the resolved config, scheduler state, Python RNG state, param groups
    model.safetensors       the draft's full fp32 state dict (exact, for resume)
    optimizer.safetensors   AdamW moments and step counts, keyed "<param name>/<field>"
    rng.safetensors         torch CPU (and CUDA) generator states

RUN/last/ is the same weights as a servable draft directory. A full disk while writing either leaves
the previous version in place (the temporary is removed) and stops with a one-line error.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from lkspec.errors import LkspecError
from lkspec.io import atomic_dir, load_tensors, read_json, save_tensors, write_error, write_json

STATE_DIR = "trainer_state"
LAST_DIR = "last"


def state_dir(run: Path) -> Path | None:
    """The trainer_state directory, also when a crash hit between atomic_dir's two renames."""
    d = run / STATE_DIR
    if (d / "state.json").is_file():
        return d
    old = run / f".{STATE_DIR}.old"
    return old if (old / "state.json").is_file() else None


def recover(run: Path) -> None:
    """Tidy what a kill mid-write leaves behind: temporaries, and a trainer_state caught between renames."""
    import shutil

    for tmp in run.glob(".*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    for name in (STATE_DIR, LAST_DIR):
        old = run / f".{name}.old"
        if old.is_dir():
            if (run / name).is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.rename(run / name)


def _opt_tensors(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, st in osd["state"].items():
        for field, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{field}"] = value.detach().cpu()
            else:
                scalars.setdefault(name, {})[field] = value
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def _opt_state_dict(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        name, _, field = key.rpartition("/")
        state.setdefault(name, {})[field] = t
    for name, extra in meta.get("scalars", {}).items():
        state.setdefault(name, {}).update(extra)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], Any]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            tensors[f"torch_cuda_{i}"] = torch.cuda.get_rng_state(i)
    version, internal, gauss = random.getstate()
    return tensors, [version, list(internal), gauss]


def set_rng_state(tensors: dict[str, torch.Tensor], py: Any) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"torch_cuda_{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"torch_cuda_{i}"], i)
    random.setstate((py[0], tuple(py[1]), py[2]))


def disk_full_error(exc: OSError, what: str, step: int, previous: int | None) -> LkspecError:
    kept = f"the checkpoint of step {previous} is intact" if previous is not None else "nothing was lost"
    return write_error(exc, f"saving the {what} at step {step} ({kept})", then="rerun with --resume",
                       full="the disk is full")


def write_trainer_state(run: Path, *, model_sd: dict[str, torch.Tensor], optim_sd: dict[str, Any],
                        state: dict[str, Any]) -> None:
    opt_tensors, opt_meta = _opt_tensors(optim_sd)
    rng_tensors, py_rng = rng_state()
    with atomic_dir(run / STATE_DIR, overwrite=True) as tmp:
        save_tensors(tmp / "model.safetensors", {k: v.detach().cpu() for k, v in model_sd.items()}, dedupe=True)
        save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        save_tensors(tmp / "rng.safetensors", rng_tensors)
        write_json(tmp / "state.json", {**state, "optimizer": opt_meta, "python_rng": py_rng})


def read_trainer_state(run: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any], Any]:
    """(model state dict, optimizer state dict, state.json, RNG restorer) of the run's latest checkpoint."""
    d = state_dir(run)
    if d is None:
        raise LkspecError(f"{run} has no {STATE_DIR}/ to resume from; start a new run without --resume")
    state = read_json(d / "state.json")
    fix = (f"the checkpoint is damaged and cannot resume; start a new run from its weights with --init-from "
           f"{run}/{LAST_DIR}")
    model_sd = load_tensors(d / "model.safetensors", fix=fix)
    optim_sd = _opt_state_dict(load_tensors(d / "optimizer.safetensors", fix=fix), state["optimizer"])
    rng = load_tensors(d / "rng.safetensors", fix=fix)
    return model_sd, optim_sd, state, lambda: set_rng_state(rng, state["python_rng"])
