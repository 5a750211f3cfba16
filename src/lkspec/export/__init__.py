"""Export drafts in the layouts vLLM (and the ArcticInference plugin) load, and import outside checkpoints.

    from lkspec.export import export_draft
    export_draft("runs/mlp", "exports/mlp", dtype="bf16")  # config.json, model.safetensors, README.md, provenance.json

Modules: `layouts` (served layouts, head truncation), `vllm_rules` (vLLM 0.32's loader rules, transcribed
and enforced before writing), `importers` (every checkpoint layout `lkspec.drafts.load_draft` accepts),
`card` (model card, provenance), `exporter` (the stage).
"""

from lkspec.export.exporter import ExportResult, export_draft
from lkspec.export.importers import Checkpoint, read_checkpoint
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
