"""Export drafts in the layouts vLLM (and the ArcticInference plugin) load: this package writes them.

    from lkspec.export import export_draft
    export_draft("runs/mlp", "exports/mlp", dtype="bf16")  # config.json, model.safetensors, README.md, provenance.json

Modules: `layouts` (served layouts, head truncation), `vllm_rules` (vLLM 0.32's loaders transcribed:
`simulate_load`, and `check_servable`, enforced before writing), `card` (model card, provenance),
`exporter` (the stage). Reading checkpoints, outside layouts included, belongs to the drafts
(`lkspec.drafts.checkpoint`), since every stage loads them; `read_checkpoint` / `Checkpoint` are
re-exported here, and `importers` kept, for older imports.
"""

from lkspec.drafts.checkpoint import Checkpoint, read_checkpoint
from lkspec.export.exporter import ExportResult, export_draft
from lkspec.export.layouts import DTYPES, FORMATS, layout, truncate
from lkspec.export.vllm_rules import VllmLoad, check_servable, simulate_load

__all__ = [
    "DTYPES",
    "FORMATS",
    "Checkpoint",
    "ExportResult",
    "VllmLoad",
    "check_servable",
    "export_draft",
    "layout",
    "read_checkpoint",
    "simulate_load",
    "truncate",
]
