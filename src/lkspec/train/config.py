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

from lkspec.config import StrictModel, flag, layered, parse
from lkspec.config import changed_keys as config_changed_keys
from lkspec.drafts import DEFAULT_ETA, DRAFTS
from lkspec.losses import DEFAULT_LOSS, GAMMA, LOSSES, check_loss_name

CONFIG_YAML = "train_config.yaml"  # a run directory's copy of its resolved config

# Keys that may differ on --resume: they change neither the weights nor the metric history.
RESUMABLE_KEYS = ("progress", "max_steps", "start_cache")
ARCH_OPTIONS = ("inner_dim", "tie_weights", "scale_input", "num_layers", "bias", "aux_layers", "intermediate_size")


class DraftOptions(StrictModel):
    """The draft to train; architecture options left unset take the architecture's defaults."""

    arch: str = Field("mlp_speculator", description="Draft architecture: mlp_speculator, medusa or eagle3.", **flag())
    num_heads: int = Field(6, ge=1, description="K, tokens drafted per round.", **flag("--num-heads", "-k"))
    inner_dim: int | None = Field(None, ge=0, description="MLP-Speculator stage width (default: the target's "
                                  "hidden size).", **flag())
    tie_weights: bool | None = Field(None, description="MLP-Speculator: share weights across stages.", **flag())
    scale_input: bool | None = Field(None, description="MLP-Speculator: RMS-normalise the target state first.",
                                     **flag())
    num_layers: int | None = Field(None, ge=1, description="MEDUSA: residual blocks per head (default 1).", **flag())
    bias: bool | None = Field(None, description="medusa: biases in the residual blocks")
    aux_layers: list[int] | None = Field(None, description="EAGLE-3: the target layers it fuses (hidden_states "
                                         "indices; default vLLM's 2, L // 2, L - 3).", **flag("--draft-aux-layers"))
    intermediate_size: int | None = Field(None, ge=1, description="EAGLE-3: MLP width of its decoder layer "
                                          "(default: the target's).")
    # how the draft starts and which tokens its heads cover (lkspec.drafts.target_init, lkspec.train.vocab)
    init: Literal["random", "target"] = Field(
        "random", description="random (the paper's recipe) or target: the target's lm_head and embedding plus "
        "least-squares state maps fitted on the training features (mlp_speculator needs inner_dim = 2 x hidden).",
        **flag("--init"))
    vocab_size: int | None = Field(None, ge=2, description="Truncated draft vocabulary: the heads keep only this "
                                   "many target tokens (default: all).", **flag("--draft-vocab-size"))
    vocab_tokens: str | None = Field(None, description="File with the draft vocabulary's token ids (a JSON list or "
                                     "one per line) instead of choosing them from the training data.")
    vocab_rank: Literal["mass", "count"] = Field("mass", description="How the kept tokens are chosen: the "
                                                 "target's probability mass on the training responses, or counts.")
    freeze: bool = Field(False, description="Keep the vocabulary-sized tensors (heads, token embeddings; EAGLE-3's "
                         "fitted fc too) fixed: no weight gradients, less compute (meant for init=target).", **flag())

    def options(self, draft_vocab_size: int | None = None, hidden_size: int | None = None) -> dict[str, Any]:
        """Architecture options the user set (the draft config fills in the rest); with the target's
        `hidden_size`, a target-initialised draft also gets the options its start needs (e.g. inner_dim)."""
        opts = {k: getattr(self, k) for k in ARCH_OPTIONS if getattr(self, k) is not None}
        if self.init == "target" and hidden_size is not None:
            opts = {**DRAFTS[self.arch].target_init_defaults(hidden_size), **opts}
        if draft_vocab_size is not None:
            opts["draft_vocab_size"] = draft_vocab_size
        return {"num_heads": self.num_heads, **opts}

    @property
    def truncated(self) -> bool:
        return self.vocab_size is not None or self.vocab_tokens is not None

    @model_validator(mode="after")
    def _options_fit_arch(self) -> DraftOptions:
        if self.arch not in DRAFTS:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(sorted(DRAFTS))}")
        cls = DRAFTS[self.arch].config_cls
        wrong = [k for k in ARCH_OPTIONS if getattr(self, k) is not None and k not in cls.model_fields]
        if wrong:
            raise ValueError(f"{self.arch} has no option {', '.join(wrong)}; remove it")
        parse(cls, {"arch": self.arch, "hidden_size": 1, "vocab_size": 1, **self.options()}, f"{self.arch} options")
        return self


class LossOptions(StrictModel):
    name: str = Field(DEFAULT_LOSS, description=f"Training objective: {', '.join(LOSSES)}.", **flag("--loss"))
    eta: float | None = Field(None, gt=0, description="eta of the LK losses' lambda = exp(-eta * alpha) (default 3 "
                              "for mlp_speculator, 10 for medusa).", **flag())
    gamma: float = Field(GAMMA, gt=0, le=1, description="Head k's loss weight is gamma^(k-1).", **flag())
    temperature: float = Field(1.0, gt=0, description="Training temperature of p and q.", **flag())
    impl: Literal["chunked", "reference", "fused"] = Field(
        "chunked", description="Loss implementation: chunked (low memory), reference (readable) or fused (chunked's "
        "arithmetic compiled by torch.compile: 1.7-2.9x faster on CPU; chunked where compiling fails).",
        **flag("--loss-impl"))

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return check_loss_name(v)


class OptimOptions(StrictModel):
    lr: float = Field(4e-4, gt=0, description="Peak learning rate.", **flag())
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay (not stated by the paper)")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps.", **flag())
    schedule: Literal["cosine", "constant"] = Field("cosine", description="after warm-up: cosine to 0, or flat")
    grad_clip: float = Field(0.5, ge=0, description="Max global gradient norm, 0 = off.", **flag())


class DataOptions(StrictModel):
    batch_size: int = Field(64, ge=1, description="Documents (sequences) per optimizer step.",
                            **flag("--batch-size", "-b"))
    batch_tokens: int | None = Field(None, ge=1, description="Token budget per step instead of --batch-size.",
                                     **flag())
    micro_batch_tokens: int = Field(2048, ge=16, description="Tokens per forward/backward; lower it when memory is "
                                    "short.", **flag())
    heldout_fraction: float = Field(0.05, ge=0, lt=1, description="Share of documents held out for evaluation "
                                    "(chosen by row hash).", **flag())
    heldout_max_docs: int = Field(512, ge=1, description="cap on held-out documents")
    shuffle: bool = Field(True, description="shuffle shards and documents every epoch")


class TrainConfig(StrictModel):
    target: str | None = Field(None, description="Target (hub id, HF dir, .gguf, or smollm2-135m-instruct); "
                               "default: the name recorded in the features. Only its lm_head is loaded.",
                               **flag("--target", "-t"))
    features: str | None = Field(None, description="Feature store directory (`lkspec data features`).",
                                 **flag("--features", "-f"))
    draft: DraftOptions = Field(default_factory=DraftOptions)
    loss: LossOptions = Field(default_factory=LossOptions)
    optim: OptimOptions = Field(default_factory=OptimOptions)
    data: DataOptions = Field(default_factory=DataOptions)
    epochs: int = Field(10, ge=1, description="Epochs.", **flag("--epochs", "-e"))
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps; the schedule is unchanged, "
                                  "so --resume can continue later.", **flag())
    seed: int = Field(0, description="Seed for draft init and data order.", **flag())
    start_cache: str | None = Field(None, description="Directory that keeps each fitted start (token map, target "
                                    "init) for reuse by runs with the same data, split, draft options and seed.",
                                    **flag())
    checkpoint_every: int = Field(200, ge=0, description="Steps between checkpoints; 0 = epoch ends only.", **flag())
    log_every: int = Field(10, ge=1, description="Steps between metrics.jsonl step records.", **flag())
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto (bf16 autocast on GPU, fp32 on "
                                                       "CPU), fp32 or bf16.", **flag())
    compile: bool | None = Field(None, description="torch.compile the draft trunk (default: on GPU only).", **flag())
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="Under torchrun: ddp (replicate) or fsdp (shard).",
                                             **flag())
    progress: bool = Field(True, description="Show a progress bar.", **flag())

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
        if self.loss.eta is not None:
            return self
        eta = DEFAULT_ETA.get(self.draft.arch, 3.0)
        return self.model_copy(update={"loss": self.loss.model_copy(update={"eta": eta})})

    @property
    def eta(self) -> float:
        return float(self.resolved().loss.eta)  # type: ignore[arg-type]


def build_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                 base: dict[str, Any] | None = None) -> TrainConfig:
    """base (e.g. a run's saved config) < YAML file < dotted overrides (flags)."""
    return parse(TrainConfig, layered(path, overrides, base), f"training config{f' {path}' if path else ''}")


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """JSON/YAML-ready resolved config (tuples as lists)."""
    return cfg.resolved().model_dump(mode="json")


def changed_keys(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = RESUMABLE_KEYS) -> list[str]:
    """What differs between two run configs, ignoring the keys a resumed run may change."""
    return config_changed_keys(old, new, ignore)


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(config_dict(cfg), sort_keys=False)
