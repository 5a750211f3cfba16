"""Draft architectures: a registry with one file per architecture, and reading them back in any layout.

    from lkspec.drafts import build_draft, load_draft
    draft = build_draft("mlp_speculator", hidden_size=576, vocab_size=49152, inner_dim=256, seed=0)

Modules, lowest first: `base` (the alignment contract, `propose`, `save`, the registry), `vllm_names`
(vLLM 0.32's names for draft files), `medusa` / `mlp_speculator` (one architecture each), `checkpoint`
(`read_checkpoint` / `load_draft`: lkspec, lkspec-export, vLLM, fms and FasterDecoding layouts). This
package imports nothing from the stages above it (train, evaluate, export).
"""

from lkspec.drafts import medusa, mlp_speculator  # noqa: F401  (register the architectures)
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
