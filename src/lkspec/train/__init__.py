"""`lkspec train`: features -> a trained draft, with the paper's recipe, exact resume and torchrun scale-out.

    from lkspec.train import TrainConfig, build_config, train
    cfg = build_config("configs/train-embedded.yaml", {"epochs": 2})
    result = train(cfg, "runs/mlp-lk")          # runs/mlp-lk is a draft directory (best held-out tau)

Modules: `config` (typed recipe), `setup` (run directory, data, teacher, draft, optimizer: built in one
place), `batching` (split, global batches, packing), `step` (heads one at a time, lambda from the global
batch), `metrics` (exact sums, typed summaries), `checkpoint` (safetensors + JSON state), `distributed`
(torchrun: ddp / fsdp), `loop` (epochs, evaluation, best draft, resume).
"""

from __future__ import annotations

from typing import Any

from lkspec.train.config import TrainConfig, build_config

__all__ = ["TrainConfig", "TrainResult", "build_config", "train"]


def __getattr__(name: str) -> Any:
    """The loop (torch.distributed, transformers' schedulers) loads on first use, so that the CLI, which
    only needs the config schema to build its flags, starts without it."""
    if name in ("train", "TrainResult"):
        from lkspec.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'lkspec.train' has no attribute {name!r}")
