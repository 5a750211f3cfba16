"""`lkspec export`: a draft directory (a training run, an lkspec checkpoint or an outside checkpoint) ->
a directory vLLM serves, with a model card and provenance.

Order matters for "bad input loses nothing": every check that can fail (output exists, heads, dtype
overflow, non-finite weights, vLLM's loader rules, eval results, base model) runs before anything is
written; the directory is built under a temporary name, re-imported and compared head by head with the
draft it came from, and only then renamed into place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lkspec.drafts import Draft, MLPSpeculator, load_draft
from lkspec.drafts.checkpoint import EXPORT_FORMAT, PROVENANCE_FILE, read_checkpoint
from lkspec.errors import LkspecError
from lkspec.export.card import KNOWN_ARCHS, KNOWN_HUB_IDS, git_state, model_card, provenance, select_eval_rows
from lkspec.export.layouts import OFF_MAP_LOGIT, full_vocab_mlp, mlp_mix_ratio, parse_dtype, truncate
from lkspec.export.layouts import layout as served_layout
from lkspec.export.vllm_rules import check_servable
from lkspec.io import atomic_dir, read_json, save_tensors, sha256_file, write_json

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
README_FILE = "README.md"


@dataclass
class ExportResult:
    out: Path
    config: dict[str, Any]
    num_heads: int
    roundtrip: dict[str, float]


def source_meta(src: Path, raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(training metadata, target identity) recorded with a draft: a run's `lkspec` block or an export's
    provenance.json; empty for outside checkpoints."""
    meta = raw.get("lkspec")
    if meta:
        return dict(meta), meta.get("target")
    if (src / PROVENANCE_FILE).is_file():
        prov = read_json(src / PROVENANCE_FILE)
        return {**(prov.get("training") or {}), "data": prov.get("data")}, prov.get("target")
    return {}, None


def resolve_base_model(flag: str | None, target: dict[str, Any] | None, raw: dict[str, Any], src: Path) -> str:
    """What `base_model_name_or_path` says: --base-model, else what the checkpoint recorded, else the
    target's name (the embedded target maps to its hub id)."""
    if flag:
        return flag
    if raw.get("base_model_name_or_path"):
        return str(raw["base_model_name_or_path"])
    if target and target.get("name"):
        name = str(target["name"])
        base = KNOWN_HUB_IDS.get(name.lower(), name)
        if "/" not in base:
            log.warning("base model %r is a local name, not a hub id; pass --base-model with the id your "
                        "servers load", base)
        return base
    raise LkspecError(f"{src} does not record its target model; pass --base-model (the hub id or path servers load)")


def resolve_base_archs(flags: list[str] | None, base: str, target: dict[str, Any] | None) -> list[str] | None:
    """The target's HF architectures (ArcticInference checks them): flags, a known target, or a local dir."""
    if flags:
        return list(flags)
    for key in (base, (target or {}).get("name") or ""):
        if key.lower() in KNOWN_ARCHS:
            return KNOWN_ARCHS[key.lower()]
    cfg = Path(base) / CONFIG_FILE
    if cfg.is_file():
        archs = read_json(cfg).get("architectures")
        if archs:
            return list(archs)
    return None


def head_logits_gap(a: Draft, b: Draft, seed: int = 0, columns: torch.Tensor | None = None) -> tuple[float, float]:
    """(max |Δ logits|, max |Δ logits| / max |logits|) over every head on random inputs; only the vocabulary
    `columns` when given (a token-map draft against its full-vocabulary twin: the kept tokens)."""
    g = torch.Generator().manual_seed(seed)
    T = a.num_heads + 4
    hidden = torch.randn(2, T, a.input_width, generator=g)
    ids = torch.randint(0, a.config.vocab_size, (2, T), generator=g)
    worst = scale = 0.0
    with torch.no_grad():
        for x, y in zip(a(hidden, ids), b(hidden, ids), strict=True):
            if columns is not None:
                x, y = x[..., columns], y[..., columns]
            worst = max(worst, (x.float() - y.float()).abs().max().item())
            scale = max(scale, x.float().abs().max().item())
    return worst, worst / max(scale, 1e-30)


def is_export(path: Path) -> bool:
    """Whether `path` is a directory `export_draft` wrote (its provenance.json says so)."""
    try:
        prov = read_json(path / PROVENANCE_FILE)
    except (OSError, ValueError):
        return False
    return path.is_dir() and isinstance(prov, dict) and str(prov.get("format", "")).startswith(EXPORT_FORMAT)


def export_draft(
    draft_dir: str | Path,
    out: str | Path,
    *,
    dtype: str = "bf16",
    fmt: str = "vllm",
    num_speculative_tokens: int | None = None,
    base_model: str | None = None,
    base_model_archs: list[str] | None = None,
    eval_results: str | Path | None = None,
    eval_draft: str | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write `out` = config.json + model.safetensors (vLLM / Arctic layout) + README.md + provenance.json."""
    src, dst = Path(draft_dir), Path(out)
    if dst.exists() and not overwrite:
        raise LkspecError(f"{dst} already exists; pass --overwrite to replace it or choose another --out")
    if dst.resolve() == src.resolve() or dst.resolve() in src.resolve().parents:
        raise LkspecError(f"--out {dst} would replace the draft being exported ({src}); choose another --out")
    if dst.exists() and not is_export(dst):
        raise LkspecError(f"--overwrite replaces only a previous lkspec export, and {dst} is not one (no "
                          f"{PROVENANCE_FILE} written by lkspec export); choose another --out")
    torch_dtype = parse_dtype(dtype)
    source = read_checkpoint(src, weights=False)
    raw, layout_name = source.raw, source.layout
    meta, target = source_meta(src, raw)
    log.info("loading draft %s", src)
    draft = load_draft(src)
    K = draft.num_heads
    n = K if num_speculative_tokens is None else num_speculative_tokens
    exported = truncate(draft, n)
    expansion: dict[str, Any] | None = None
    if isinstance(exported, MLPSpeculator) and exported.config.truncated:
        log.info("expanding the token-map draft to its exact full-vocabulary twin (vLLM's MLPSpeculator layout)")
        wide = full_vocab_mlp(exported)  # vLLM's MLPSpeculator cannot hold a token map: an exact twin
        gap, _ = head_logits_gap(exported, wide, columns=exported.token_map)
        expansion = {"draft_vocab_size": exported.config.draft_vocab_size, "inner_dim": wide.config.inner,
                     "off_map_logit": OFF_MAP_LOGIT, "max_kept_logit_gap": gap}
        exported = wide
    base = resolve_base_model(base_model, target, raw, src)
    archs = resolve_base_archs(base_model_archs, base, target) if fmt == "arctic" else base_model_archs
    cfg, tensors = served_layout(exported, fmt=fmt, dtype=torch_dtype, base_model=base, base_model_archs=archs)
    check_servable(cfg, tensors)
    eval_rows = eval_meta = None
    if eval_results is not None:
        eval_rows, eval_meta = select_eval_rows(eval_results, draft_dir=src, label=eval_draft, target=target)
    commit, dirty = git_state()
    export_settings: dict[str, Any] = {
        "format": fmt,
        "dtype": dtype,
        "num_speculative_tokens": n,
        "source_num_heads": K,
        "base_model_name_or_path": base,
        "base_model_archs": archs,
        "eval_results": Path(eval_results).name if eval_results is not None else None,
        "repo_id": repo_id,
        "eval_rows": len(eval_rows) if eval_rows else 0,
    }
    if expansion is not None:
        export_settings["full_vocab_expansion"] = expansion
    if isinstance(draft, MLPSpeculator) and n != K:
        export_settings["emb_rescale"] = mlp_mix_ratio(K, draft.config.inner) / mlp_mix_ratio(n, draft.config.inner)
    model_ref = repo_id or "."  # the card never names a local absolute path
    card = model_card(draft=exported, fmt=fmt, dtype=dtype, base_model=base, model_id=model_ref, meta=meta,
                      target=target, eval_rows=eval_rows, eval_meta=eval_meta, source_heads=K, commit=commit,
                      source_config=draft.config.model_dump(),
                      eval_label=str(eval_rows[0]["draft"]) if eval_rows else None)
    prov = provenance(draft=exported, source=src, layout_name=layout_name, meta=meta, target=target,
                      export=export_settings, commit=commit, dirty=dirty)
    try:
        with atomic_dir(dst, overwrite=overwrite) as tmp:
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            log.info("writing %s (%.2f GiB) and config.json, README.md", WEIGHTS_FILE, size / 2**30)
            save_tensors(tmp / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
            write_json(tmp / CONFIG_FILE, cfg)
            (tmp / README_FILE).write_text(card)
            # the export must load back through the importer as the same draft: same config, every tensor the
            # rounded one we wrote (so every head's logits are those of the weights rounded to --dtype)
            write_json(tmp / PROVENANCE_FILE, prov)  # the reader takes what the layout cannot say (EAGLE-3's K) from it
            log.info("checking that the export reloads as the same draft (every tensor, every head's logits)")
            back = load_draft(tmp)
            _, reloaded = served_layout(back, fmt=fmt, dtype=torch_dtype, base_model=base, base_model_archs=archs)
            differ = [k for k, t in tensors.items() if k not in reloaded or not torch.equal(reloaded[k], t)]
            if back.config != exported.config or differ:
                raise LkspecError(f"internal error: the export does not reload as written ({differ[:3]}); "
                                  f"please report it")
            _, rel = head_logits_gap(exported, back)
            prov["roundtrip"] = {"reloads_identically": True, "max_rel_logit_gap_vs_source": rel}
            del back, reloaded
            prov["files"] = {name: sha256_file(tmp / name) for name in (WEIGHTS_FILE, CONFIG_FILE, README_FILE)}
            write_json(tmp / PROVENANCE_FILE, prov)
    except FileExistsError:
        raise LkspecError(f"{dst} appeared while exporting; pass --overwrite or choose another --out") from None
    log.info("exported %s (%s, %s, %d heads) to %s", draft.arch, fmt, dtype, n, dst)
    return ExportResult(out=dst, config=cfg, num_heads=n, roundtrip=prov["roundtrip"])
