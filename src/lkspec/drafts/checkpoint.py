"""Reading draft checkpoints in every layout lkspec accepts, into lkspec's names, configs and drafts.

`load_draft` (and `read_draft_config`, without weights) go through `read_checkpoint`, so eval / generate /
export / training restarts accept all of these:

* lkspec's own directories (config.json with an `lkspec` block: training runs, `Draft.save`);
* lkspec exports (pure vLLM config.json + provenance.json, which carries the target identity);
* vLLM-native directories written by other tools (e.g. `abhigoyal/vllm-medusa-vicuna-7b-v1.3`);
* IBM fms MLP-Speculators (`speculator.` prefix, sharded files, tied checkpoints that store the shared
  tensors once: stages are expanded, as fms itself ties them);
* FasterDecoding MEDUSA (`medusa_num_heads` / `medusa_num_layers`, keys `{h}.{l}.linear.weight|bias` and
  `{h}.{L}.weight`, biases, often `medusa_lm_head.safetensors`) and files with a `medusa_heads.` prefix.

Reading lives here, beside the drafts, and not in `lkspec.export`: every stage loads drafts, so the
lowest layer must not reach up into the one that writes exports. It builds on `base` (registry, config
classes) and `vllm_names`, and nothing in `lkspec.drafts` below it imports it.

Weights are read with safetensors only. A directory with only `.pt`/`.bin` files is refused with the
command that converts it (torch's `weights_only` loader, run by the user on a file they trust), because a
pickle can run code when it is loaded. Names follow vLLM 0.32's own mapping (`vllm_names`), so what we
import is what vLLM would serve; where vLLM would silently drop something (FasterDecoding biases without
`medusa_fc_bias`) we keep it and say so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lkspec.config import parse
from lkspec.drafts.base import CONFIG_FILE, WEIGHTS_FILE, Draft, DraftConfig, check_draft_target, draft_class
from lkspec.drafts.outside_layouts import PLANS, Plan, arch_of, short_list
from lkspec.drafts.vllm_names import tied_source
from lkspec.errors import LkspecError
from lkspec.io import open_safetensors, read_json, tensor_aliases
from lkspec.targets import TargetIdentity, TargetTensors

log = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"
EXPORT_FORMAT = "lkspec-export/"  # provenance.json "format" of an lkspec export, + version
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")

DAMAGED_DRAFT = ("the draft's weights are damaged; re-export it, or retrain it (a training run keeps a copy "
                 "in RUN/last)")


@dataclass
class Checkpoint:
    """A checkpoint in lkspec's terms: its config, tensors under lkspec's names, and the recorded target."""

    config: DraftConfig
    tensors: dict[str, torch.Tensor] | None  # None when read with weights=False
    target: dict[str, Any] | None
    layout: str  # "lkspec", "lkspec-export", "vllm", "fms", "fasterdecoding"
    raw: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    from_target: list[str] = field(default_factory=list)  # left to the target by the layout (EAGLE-3's embedding)


def weight_files(d: Path, *, only: str | None = None) -> list[Path]:
    """The safetensors files a loader would read (an index's shards, else every *.safetensors)."""
    if only is not None:
        if not (d / only).is_file():
            raise LkspecError(f"{d} has no {only}; the checkpoint is incomplete")
        return [d / only]
    for index in sorted(d.glob("*.safetensors.index.json")):
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise LkspecError(f"{index} lists shards that are missing: {short_list(missing)}; download them")
        return [d / s for s in shards]
    files = sorted(p for p in d.glob("*.safetensors") if not p.name.startswith("."))
    if files:
        return files
    pickles = sorted(p for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        f = pickles[0]
        raise LkspecError(
            f"{d} has only pickle weights ({', '.join(p.name for p in pickles)}) and lkspec never unpickles files; "
            f"convert them once, on a file you trust: python -c \"import torch; from safetensors.torch import "
            f"save_file; sd = torch.load('{f}', map_location='cpu', weights_only=True); "
            f"save_file({{k: v.contiguous().clone() for k, v in sd.items()}}, '{f.with_suffix('.safetensors')}')\""
        )
    raise LkspecError(f"{d} has no *.safetensors weights; pass a draft directory with its weights")


def _scan(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """{tensor name: (file, shape)} from the safetensors headers only (nothing is loaded)."""
    out: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        with open_safetensors(f, DAMAGED_DRAFT) as s:
            for k in s.keys():  # noqa: SIM118 (safe_open is not a dict)
                if k in out:
                    raise LkspecError(f"tensor {k!r} appears in both {out[k][0].name} and {f.name}; keep one copy")
                out[k] = (f, tuple(s.get_slice(k).get_shape()))
    return out


def expected_names(config: DraftConfig) -> set[str]:
    """Every tensor name lkspec's draft of this config saves. Names depend on structure, not widths, so a
    1-wide twin answers it without allocating the real vocabulary matrices."""
    widths: dict[str, int | None] = {k: 1 for k in ("hidden_size", "vocab_size", "inner_dim")
                                     if k in type(config).model_fields}
    if config.truncated:  # keep the token map in the twin: 1 row out of 2 tokens
        widths.update(vocab_size=2, draft_vocab_size=1)
    return set(draft_class(config.arch)(config.model_copy(update=widths)).export_state_dict())


def check_shapes(d: Path, config: DraftConfig, found: dict[str, tuple[int, ...]]) -> None:
    """A config.json edited or copied from another draft (wrong vocab_size, hidden_size, inner_dim) is named
    as such: without this it surfaces as a mismatch with the target or a tensor-copy traceback."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        want = {k: tuple(v.shape) for k, v in draft_class(config.arch)(config).export_state_dict().items()}
    wrong = [(k, shape) for k, shape in found.items() if k in want and want[k] != tuple(shape)]
    if wrong:
        k, shape = wrong[0]
        raise LkspecError(f"{d}/{CONFIG_FILE} does not match the draft's weights: {k} is {list(shape)} in the "
                          f"weights but {list(want[k])} by the config ({len(wrong)} tensors differ); fix "
                          f"vocab_size / hidden_size / inner_dim in {CONFIG_FILE} or re-export the draft")


def read_checkpoint(path: str | Path, *, weights: bool = True) -> Checkpoint:
    """Read a draft directory in any supported layout (see the module docstring).

    Refuses with one line: a directory without config.json or weights, pickle-only weights, an unknown
    layout, and tensors that are missing or have no place (both listed, under the file's own names).
    """
    d = Path(path)
    if not (d / CONFIG_FILE).is_file():
        raise LkspecError(f"{d} has no {CONFIG_FILE}; pass a draft directory written by `lkspec train` or export")
    raw = read_json(d / CONFIG_FILE)
    meta = raw.get("lkspec")
    if meta:
        cls = draft_class(meta["arch"])
        config = parse(cls.config_cls, meta["config"], f"draft config in {d}/{CONFIG_FILE}")
        files = weight_files(d, only=WEIGHTS_FILE) if weights else []
        scan = _scan(files)
        plan = Plan(config.arch, config.model_dump(), {k: (f, k) for k, (f, _) in scan.items()}, layout="lkspec")
        for f in files:  # tied tensors stored once (Draft.save): read through their aliases
            plan.aliases.update({k: v for k, v in tensor_aliases(f).items() if v in plan.sources})
        target = meta.get("target")
    else:
        arch = arch_of(raw, d)
        prov = read_json(d / PROVENANCE_FILE) if (d / PROVENANCE_FILE).is_file() else None
        scan = _scan(weight_files(d, only=WEIGHTS_FILE if prov else None))
        plan = PLANS[arch](raw, scan, d)
        if prov:
            plan.layout = "lkspec-export"
            if arch == "eagle3":  # the layout has no K; the export recorded it
                plan.config["num_heads"] = int(prov.get("export", {}).get("num_speculative_tokens") or
                                               plan.config["num_heads"])
        cls = draft_class(arch)
        config = parse(cls.config_cls, plan.config, f"draft config derived from {d}/{CONFIG_FILE}")
        target = (prov or {}).get("target")
    for note in plan.notes:
        log.info("%s: %s", d, note)
    if not weights:
        return Checkpoint(config, None, target, plan.layout, raw, plan.notes,
                          sorted(plan.from_target - set(plan.sources)))
    from_target = sorted(plan.from_target - set(plan.sources))
    expected = expected_names(config) - set(from_target)
    have = set(plan.sources) | set(plan.aliases)
    missing = sorted(expected - have)
    shared = set(plan.aliases.values())  # e.g. original_lm_head's lm_head.weight: used through its aliases
    unknown = sorted(plan.sources[n][1] for n in set(plan.sources) - expected - shared
                     if plan.sources[n][1] not in plan.skip)
    if missing or unknown:
        hint = ""
        if unknown and all(k.endswith(".bias") for k in unknown) and config.arch == "medusa":
            hint = " (biases present but medusa_fc_bias is false: set it true in config.json)"
        raise LkspecError(
            f"{d}: tensors do not match its config ({plan.layout} layout): missing {short_list(missing)}, "
            f"unknown {short_list(unknown)}{hint}; fix config.json or the weights"
        )
    origin = {name: plan.aliases.get(name, name) for name in expected}  # lkspec name -> source it reads
    check_shapes(d, config, {name: scan[plan.sources[src][1]][1] for name, src in origin.items()
                             if plan.sources[src][1] in scan})
    by_file: dict[Path, set[str]] = {}
    for src in set(origin.values()):
        by_file.setdefault(plan.sources[src][0], set()).add(src)
    loaded: dict[str, torch.Tensor] = {}
    for f, srcs in by_file.items():
        with open_safetensors(f, DAMAGED_DRAFT) as s:
            for src in srcs:
                loaded[src] = s.get_tensor(plan.sources[src][1])
    tensors = {name: loaded[src] * plan.scale[name] if name in plan.scale else loaded[src]
               for name, src in origin.items()}
    for name in plan.offset:
        tensors[name] = torch.arange(tensors[name].numel()) + tensors[name].long()
    if config.arch == "mlp_speculator" and getattr(config, "tie_weights", False):
        for name in sorted(tensors):
            src = tied_source(name)
            if src is not None and not torch.equal(tensors[name], tensors[src]):
                raise LkspecError(f"{d}: tie_weights is true but {name} differs from {src}; lkspec ties them as "
                                  f"fms does, so set tie_weights false if the stages really differ")
    return Checkpoint(config, tensors, target, plan.layout, raw, plan.notes, from_target)


def read_draft_config(path: str | Path) -> tuple[DraftConfig, dict[str, Any]]:
    """(draft config, full config.json) of a checkpoint directory in any layout lkspec reads, without
    loading weights (outside layouts may take shapes from the safetensors headers)."""
    ck = read_checkpoint(path, weights=False)
    return ck.config, ck.raw


def load_draft(path: str | Path, *, target: TargetIdentity | None = None, device: str | torch.device = "cpu",
               tables: Callable[[], TargetTensors] | None = None) -> Draft:
    """Load a checkpoint directory in fp32: lkspec's own, an lkspec export, or an outside layout that
    `read_checkpoint` reads (vLLM-native, IBM fms, FasterDecoding MEDUSA).

    With `target`, refuse a draft whose recorded target identity or shapes do not match it.
    """
    d = Path(path)
    ckpt = read_checkpoint(d)
    config, tensors = ckpt.config, ckpt.tensors
    assert tensors is not None
    if target is not None:
        check_draft_target(config, target, what=f"draft {d}")
        if ckpt.target:
            target.check(ckpt.target, what=f"draft {d}")
    draft = draft_class(config.arch)(config)
    if ckpt.from_target:  # e.g. the authors' EAGLE-3 checkpoints: vLLM shares the target's embedding with them
        if tables is None:
            raise LkspecError(f"{d} leaves {', '.join(ckpt.from_target)} to its target (vLLM shares the target's); "
                              f"load it where the target is loaded (lkspec eval / generate / train --init-from)")
        draft.adopt_target(tables)
        tensors = {**tensors, **{n: v for n, v in draft.state_dict().items() if n in ckpt.from_target}}
    expected = set(draft.export_state_dict())
    missing, unknown = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unknown:
        raise LkspecError(
            f"{d}/{WEIGHTS_FILE} does not match its config: missing {missing[:6]}{'…' if len(missing) > 6 else ''}, "
            f"unknown {unknown[:6]}{'…' if len(unknown) > 6 else ''}; re-export it or fix config.json"
        )
    with torch.no_grad():
        for name, param in draft.state_dict(keep_vars=True).items():
            src = tensors[name]
            if src.shape != param.shape:
                raise LkspecError(f"{d}: tensor {name} has shape {tuple(src.shape)}, expected {tuple(param.shape)}")
            param.copy_(src.to(param.dtype))
    return draft.to(device)

