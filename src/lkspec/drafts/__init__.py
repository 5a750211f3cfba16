"""Draft architectures: a registry with one file per architecture, and reading them back in any layout.

    from lkspec.drafts import build_draft, load_draft
    draft = build_draft("mlp_speculator", hidden_size=576, vocab_size=49152, inner_dim=256, seed=0)

Modules, lowest first: `base` (the alignment contract, `propose`, `save`, the registry), `vllm_names`
(vLLM's names for draft files), `medusa` / `mlp_speculator` / `eagle3` (one architecture each),
`outside_layouts` (how other tools' layouts map onto them), `checkpoint` (`read_checkpoint` /
`load_draft`: lkspec, lkspec-export, vLLM, speculators, fms and FasterDecoding layouts). This package
imports nothing from the stages above it (train, evaluate, export).
"""

from lkspec.drafts import eagle3, medusa, mlp_speculator  # noqa: F401  (register the architectures)
from lkspec.drafts.base import (
    DRAFTS,
    Draft,
    DraftConfig,
    Proposal,
    build_draft,
    check_draft_target,
    draft_class,
    register,
)
from lkspec.drafts.checkpoint import Checkpoint, load_draft, read_checkpoint, read_draft_config
from lkspec.drafts.eagle3 import Eagle3, Eagle3Config
from lkspec.drafts.medusa import Medusa, MedusaConfig
from lkspec.drafts.mlp_speculator import MLPSpeculator, MLPSpeculatorConfig

DEFAULT_ETA = {arch: cls.default_eta for arch, cls in DRAFTS.items()}
"""The paper's eta for L^lambda per architecture (MEDUSA's acceptance rises slower, so it moves to TV sooner)."""

__all__ = [
    "DEFAULT_ETA",
    "DRAFTS",
    "Checkpoint",
    "Draft",
    "DraftConfig",
    "Eagle3",
    "Eagle3Config",
    "MLPSpeculator",
    "MLPSpeculatorConfig",
    "Medusa",
    "MedusaConfig",
    "Proposal",
    "build_draft",
    "check_draft_target",
    "draft_class",
    "load_draft",
    "read_checkpoint",
    "read_draft_config",
    "register",
]
