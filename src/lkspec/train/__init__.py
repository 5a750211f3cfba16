"""`lkspec train`: features -> a trained draft, with the paper's recipe, exact resume and torchrun scale-out.

    from lkspec.train import TrainConfig, build_config, train
    cfg = build_config("configs/train-embedded.yaml", {"epochs": 2})
    result = train(cfg, "runs/mlp-lk")          # runs/mlp-lk is a draft directory (best held-out tau)

Modules: `config` (typed recipe), `batching` (split, global batches, packing), `step` (heads one at a
time, lambda from the global batch), `metrics` (exact sums), `checkpoint` (safetensors + JSON state),
`distributed` (torchrun: ddp / fsdp), `loop` (epochs, evaluation, best draft, resume).
"""

from lkspec.train.config import TrainConfig, build_config
from lkspec.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "build_config", "train"]
