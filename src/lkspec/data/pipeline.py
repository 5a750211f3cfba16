"""`lkspec data all`: prompts -> regenerate -> features into one directory, each stage resumable.

Every stage already skips finished work (regeneration keeps its parts, features keep their shards), so
this is only the wiring: a rerun after an interruption, or after everything finished, is cheap. With the `hf`
backend regeneration keeps the target's states for the features (`lkspec.data.states`): no second pass.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lkspec.data.features import extract_features
from lkspec.data.prompts import PromptConfig, load_prompts, write_prompts_jsonl
from lkspec.data.regenerate import RegenConfig, regenerate
from lkspec.data.states import StateSpec
from lkspec.targets import Target

log = logging.getLogger(__name__)


def run_all(get_target: Callable[[str], Target], prompts: PromptConfig, regen: RegenConfig, out: str | Path, *,
            progress: bool = True, **features: Any) -> dict[str, Path]:
    """`get_target(stage)` for stage "regenerate" / "features" (the vLLM backend keeps its HF copy on CPU)."""
    out = Path(out)
    paths = {"prompts": out / "prompts.jsonl", "tokens": out / "tokens", "features": out / "features"}
    ps = load_prompts(prompts, progress=progress)
    new = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in ps.records)
    if paths["prompts"].is_file() and paths["prompts"].read_text(encoding="utf-8") == new:
        log.info("prompts: %s is up to date (%d prompts)", paths["prompts"], len(ps.records))
    else:
        write_prompts_jsonl(ps, paths["prompts"])
    target = get_target("regenerate")
    # the hf backend computes every state the features need on its way: it keeps them (lkspec.data.states)
    wanted = inspect.signature(extract_features).bind_partial(**features)
    wanted.apply_defaults()  # what extract_features will ask for, its own defaults included
    keep = StateSpec(wanted.arguments["dtype"], tuple(wanted.arguments["aux_layers"] or ()))
    regenerate(target, ps, paths["tokens"], regen, progress=progress, states=keep)
    if regen.backend != "hf":
        target = get_target("features")
    extract_features(target, paths["tokens"], paths["features"], progress=progress, **features)
    return paths
