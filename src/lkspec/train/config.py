"""The training config: one typed, strict model whose defaults are the paper's recipe.

Defaults (reference/paper.md §4, paper §5.3): AdamW beta (0.9, 0.95), lr 4e-4, cosine schedule with 100
warm-up steps, grad-clip 0.5, batch 64 sequences, 10 epochs from random init, K = 6, gamma = 0.8,
training temperature 1, loss `lk_hybrid` with eta = 3 (MLP-Speculator) or 10 (MEDUSA). The paper does
not state weight decay; we use 0.

A config comes from a YAML file and/or flags (flags win); `--set a.b=v` sets any dotted key. Unknown
keys are one-line errors. The *resolved* config (eta filled in from the architecture) is what a run
saves and what `--resume` compares against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from lkspec.config import StrictModel, parse
from lkspec.errors import LkspecError
from lkspec.losses import GAMMA, LOSSES

# Keys that may differ on --resume: they change neither the weights nor the metric history.
RESUMABLE_KEYS = ("progress", "max_steps")
ARCH_OPTIONS = ("inner_dim", "tie_weights", "scale_input", "num_layers", "bias")


class DraftOptions(StrictModel):
    """The draft to train; architecture options left unset take the architecture's defaults."""

    arch: str = Field("mlp_speculator", description="mlp_speculator or medusa")
    num_heads: int = Field(6, ge=1, description="K: tokens drafted per round")
    inner_dim: int | None = Field(None, ge=0, description="mlp_speculator stage width (0 = target hidden size)")
    tie_weights: bool | None = Field(None, description="mlp_speculator: share weights across stages")
    scale_input: bool | None = Field(None, description="mlp_speculator: RMS-normalise the target state first")
    num_layers: int | None = Field(None, ge=1, description="medusa: residual blocks per head")
    bias: bool | None = Field(None, description="medusa: biases in the residual blocks")

    def options(self) -> dict[str, Any]:
        """Architecture options the user set (the draft config fills in the rest)."""
        opts = {k: getattr(self, k) for k in ARCH_OPTIONS if getattr(self, k) is not None}
        return {"num_heads": self.num_heads, **opts}

    @model_validator(mode="after")
    def _options_fit_arch(self) -> DraftOptions:
        from lkspec.drafts import DRAFTS

        if self.arch not in DRAFTS:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(sorted(DRAFTS))}")
        cls = DRAFTS[self.arch].config_cls
        wrong = [k for k in ARCH_OPTIONS if getattr(self, k) is not None and k not in cls.model_fields]
        if wrong:
            raise ValueError(f"{self.arch} has no option {', '.join(wrong)}; remove it")
        parse(cls, {"arch": self.arch, "hidden_size": 1, "vocab_size": 1, **self.options()}, f"{self.arch} options")
        return self


class LossOptions(StrictModel):
    name: str = Field("lk_hybrid", description=f"one of {', '.join(LOSSES)}")
    eta: float | None = Field(None, gt=0, description="lk_hybrid eta; default 3 (mlp_speculator) / 10 (medusa)")
    gamma: float = Field(GAMMA, gt=0, le=1, description="head k is weighted gamma^(k-1)")
    temperature: float = Field(1.0, gt=0, description="training temperature of p and q")
    impl: Literal["chunked", "reference"] = Field("chunked", description="vocab-chunked or readable loss")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in LOSSES:
            raise ValueError(f"unknown loss {v!r}; choose one of {', '.join(LOSSES)}")
        return v


class OptimOptions(StrictModel):
    lr: float = Field(4e-4, gt=0, description="peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay (not stated by the paper)")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="after warm-up: cosine to 0, or flat")
    grad_clip: float = Field(0.5, ge=0, description="max global grad norm (0 = off)")


class DataOptions(StrictModel):
    batch_size: int = Field(64, ge=1, description="documents (sequences) per optimizer step")
    batch_tokens: int | None = Field(None, ge=1, description="if set: a step takes documents up to this many tokens")
    micro_batch_tokens: int = Field(2048, ge=16, description="tokens per forward/backward (memory knob)")
    heldout_fraction: float = Field(0.05, ge=0, lt=1, description="documents held out (chosen by row hash)")
    heldout_max_docs: int = Field(512, ge=1, description="cap on held-out documents")
    shuffle: bool = Field(True, description="shuffle shards and documents every epoch")


class TrainConfig(StrictModel):
    target: str | None = Field(None, description="target spec (hub id, dir, .gguf, embedded name); default: "
                                                 "the name recorded in the features")
    features: str | None = Field(None, description="feature store directory (lkspec data features)")
    draft: DraftOptions = Field(default_factory=DraftOptions)
    loss: LossOptions = Field(default_factory=LossOptions)
    optim: OptimOptions = Field(default_factory=OptimOptions)
    data: DataOptions = Field(default_factory=DataOptions)
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (schedule unchanged)")
    seed: int = Field(0, description="draft init and data order")
    checkpoint_every: int = Field(200, ge=0, description="steps between checkpoints (0 = epoch ends only)")
    log_every: int = Field(10, ge=1, description="steps between metrics.jsonl step records")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    compile: bool | None = Field(None, description="torch.compile the draft trunk (default: on GPU only)")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="under torchrun: replicate (ddp) or shard (fsdp)")
    progress: bool = Field(True, description="show a progress bar")

    @model_validator(mode="after")
    def _micro_fits_heads(self) -> TrainConfig:
        if self.data.micro_batch_tokens < 2 * (self.draft.num_heads + 2):
            raise ValueError(
                f"data.micro_batch_tokens {self.data.micro_batch_tokens} is too small for {self.draft.num_heads} "
                f"heads; use at least {2 * (self.draft.num_heads + 2)}"
            )
        return self

    def resolved(self) -> TrainConfig:
        """The config with architecture-dependent defaults filled in (what a run records)."""
        from lkspec.drafts import DEFAULT_ETA

        if self.loss.eta is not None:
            return self
        eta = DEFAULT_ETA.get(self.draft.arch, 3.0)
        return self.model_copy(update={"loss": self.loss.model_copy(update={"eta": eta})})

    @property
    def eta(self) -> float:
        return float(self.resolved().loss.eta)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# building a config from a file and flags
# ------------------------------------------------------------------------------------------------
def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """data["a"]["b"] = value for key "a.b", creating the intermediate mappings."""
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise LkspecError(f"cannot set {key!r}: {p!r} is not a section; check the key")
        node = nxt
    node[parts[-1]] = value


def parse_assignment(text: str) -> tuple[str, Any]:
    """'optim.lr=1e-3' -> ('optim.lr', 0.001); the value is read as YAML (numbers, bools, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise LkspecError(f"--set expects KEY=VALUE (e.g. optim.lr=1e-3), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # a plain string; pydantic converts numeric strings such as 1e-3 where a number is due
    return key.strip(), value


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise LkspecError(f"config file {p} does not exist; check the path")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise LkspecError(f"config file {p} is not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise LkspecError(f"config file {p} must be a mapping of keys to values, not {type(data).__name__}")
    return data


def layered(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
            base: dict[str, Any] | None = None) -> dict[str, Any]:
    """base < YAML file < dotted overrides, merged key by key into a new dict (the inputs are not touched)."""
    data: dict[str, Any] = {}
    layers = [flatten(base or {}), flatten(read_yaml(path)) if path is not None else {}, overrides or {}]
    for layer in layers:
        for k, v in layer.items():
            set_dotted(data, k, v)
    return data


def build_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                 base: dict[str, Any] | None = None) -> TrainConfig:
    """base (e.g. a run's saved config) < YAML file < dotted overrides (flags)."""
    return parse(TrainConfig, layered(path, overrides, base), f"training config{f' {path}' if path else ''}")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """JSON/YAML-ready resolved config (tuples as lists)."""
    return cfg.resolved().model_dump(mode="json")


def changed_keys(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = RESUMABLE_KEYS) -> list[str]:
    """'key: old -> new' for every dotted key that differs (keys in `ignore` may change)."""
    a, b = flatten(old), flatten(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if k in ignore or k.split(".")[0] in ignore:
            continue
        if a.get(k) != b.get(k):
            out.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(config_dict(cfg), sort_keys=False)
