"""`lkspec demo`: drafts worth serving on the embedded target, KL vs LK, against the n-gram lookup, offline.

Settings chosen by measurement on a 2-core CPU (README "The demo", docs/results.md): drafts that start
from the target (its lm_head and embedding plus least-squares state maps, frozen vocabulary tensors,
an 8192-token draft vocabulary) instead of from random tables that a few thousand tokens cannot fill;
the target's own answers at T = 1 and at T = 0 (the two serving temperatures the table reports); lr 2e-4,
where 1e-3 first pulled the fitted start away (held-out alpha_1 0.303 -> 0.273 after one epoch). Both losses
train on the same data with the same seed, steps and schedule; only the loss differs.
"""

from __future__ import annotations

from typing import Any

from lkspec.errors import LkspecError
from lkspec.losses import BASELINE_LOSS, DEFAULT_LOSS
from lkspec.pipeline import PipelineConfig, load_pipeline_config
from lkspec.targets import EMBEDDED_NAME

ARCHS = {"mlp": ["mlp_speculator"], "medusa": ["medusa"], "eagle3": ["eagle3"], "all": ["mlp_speculator", "medusa"]}

FULL: dict[str, Any] = {
    "name": "lkspec-demo",
    "losses": [BASELINE_LOSS, DEFAULT_LOSS],
    "arch_options": {"mlp_speculator": {"tie_weights": True}, "medusa": {"num_layers": 1}},
    # EAGLE-3's attention path starts from a fitted but small map and needs the larger step: held-out tau after one
    # epoch on the demo's T = 1 half 1.378 at lr 1e-3 vs 1.360 at 2e-4 (the MLP's 2e-4 protects its fitted start)
    "arch_train": {"eagle3": {"optim": {"lr": 1.0e-3}}},
    "data": {
        # the target's own answers twice: sampled (T = 1) and greedy (T = 0), on different prompts
        "prompts": {"source": "sharegpt", "limit": 224, "max_chars": 1000, "seed": 0},
        "regenerate": {"max_new_tokens": 80, "temperature": 1.0, "batch_size": 32, "max_prompt_tokens": 320},
        "extra": [{"prompts": {"source": "sharegpt", "limit": 224, "max_chars": 1000, "seed": 1},
                   "regenerate": {"max_new_tokens": 80, "temperature": 0.0, "batch_size": 32,
                                  "max_prompt_tokens": 320}}],
        "features": {"dtype": "bfloat16", "batch_size": 16},
    },
    "train": {
        "draft": {"init": "target", "vocab_size": 8192, "freeze": True},
        "epochs": 3,
        "seed": 0,
        "optim": {"lr": 2.0e-4, "warmup_steps": 10},
        "data": {"batch_size": 8, "heldout_fraction": 0.08, "micro_batch_tokens": 4096},
        "checkpoint_every": 0,
        "log_every": 2,
    },
    "eval": {"benchmarks": ["mtbench", "humaneval", "gsm8k"], "limit": 10, "max_new_tokens": 96,
             "temperatures": [0.0, 1.0], "rules": ["sampled", "greedy"], "k": 6, "seeds": [0], "batch_size": 10},
    "export": {"dtype": "bf16", "format": "vllm"},
}

QUICK: dict[str, Any] = {
    "name": "lkspec-demo-quick",
    "data": {
        "prompts": {"limit": 40},
        "regenerate": {"max_new_tokens": 32, "batch_size": 20},
        "extra": [{"prompts": {"source": "sharegpt", "limit": 24, "max_chars": 1000, "seed": 1},
                   "regenerate": {"max_new_tokens": 32, "temperature": 0.0, "batch_size": 24,
                                  "max_prompt_tokens": 320}}],
    },
    "train": {"epochs": 1, "data": {"heldout_fraction": 0.1}, "optim": {"warmup_steps": 2}, "log_every": 1},
    "eval": {"limit": 3, "max_new_tokens": 24},
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def demo_config(*, quick: bool = False, scale: float = 1.0, arch: str = "mlp", target: str = EMBEDDED_NAME,
                overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """The demo's pipeline config; `scale` multiplies the prompt budget and the evaluation prompts."""
    if arch not in ARCHS:
        raise LkspecError(f"unknown --arch {arch!r}; choose {', '.join(ARCHS)}")
    if not scale > 0:
        raise LkspecError(f"--scale must be positive, got {scale}")
    base = _merge(FULL, QUICK) if quick else dict(FULL)
    base = _merge(base, {"target": target, "archs": ARCHS[arch]})
    prompts = base["data"]["prompts"]["limit"]
    limit = base["eval"]["limit"]
    extra = [_merge(p, {"prompts": {"limit": max(8, round(p["prompts"]["limit"] * scale))}})
             for p in base["data"]["extra"]]
    base = _merge(base, {"data": {"prompts": {"limit": max(8, round(prompts * scale))}, "extra": extra},
                         "eval": {"limit": max(1, round(limit * scale))}})
    return load_pipeline_config(None, overrides, base=base)
