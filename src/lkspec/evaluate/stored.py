"""An evaluation kept whole, so that a rerun of a pipeline does not replay drafts it already replayed.

`EvalReport`'s JSON (`lkspec-eval/1`) holds aggregates; the per-prompt counts behind them (what the paired
bootstrap and the seed pooling resample) are not in it. This file keeps every field the report was built
from, beside the inputs that decided it: the settings, the target, and each draft's label, path and weights
digest. A pipeline rerun with the same inputs rebuilds the identical report from it (floats round-trip
exactly through JSON); any changed input — a retrained draft, another setting — replays again. The cached
target samples (lkspec.evaluate.samples) are a separate, finer cache that every replay reuses.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lkspec.drafts.checkpoint import weight_files
from lkspec.evaluate.replay import PromptReplay
from lkspec.evaluate.report import Cell, Cost, EvalReport
from lkspec.io import read_json, sha256_file, write_json
from lkspec.speed import Costs

log = logging.getLogger(__name__)

STORED_FORMAT = "lkspec-eval-state/1"


def weight_digests(draft_dir: str | Path) -> list[str]:
    """sha256 of each weight file of a draft directory: what says two evaluations saw the same draft."""
    return [sha256_file(f) for f in weight_files(Path(draft_dir))]


def eval_inputs(settings: Any, target: dict[str, Any],
                drafts: Sequence[tuple[str, str, list[str]]]) -> dict[str, Any]:
    """What decides a report: settings (a pydantic model), the target identity, and each draft's (label,
    directory, weight_digests)."""
    return {
        "settings": settings.model_dump(mode="json"),
        "target": target,
        "drafts": [{"label": lab, "path": str(path), "weights": weights} for lab, path, weights in drafts],
    }


def _prompt(p: PromptReplay) -> list[Any]:
    return [p.tokens, p.rounds, p.tried.tolist(), p.accepted.tolist(), p.alpha_sum.tolist(), p.alpha_count.tolist()]


def save_report(path: Path, report: EvalReport, inputs: dict[str, Any]) -> None:
    cells = [{"key": list(key), "prompts": [_prompt(p) for p in cell.prompts]} for key, cell in report.cells.items()]
    costs = [{"key": list(key), **dataclasses.asdict(c)} for key, c in report.costs.items()]
    write_json(path, {
        "format": STORED_FORMAT, "inputs": inputs,
        "report": {"target": report.target, "drafts": report.drafts, "benchmarks": report.benchmarks,
                   "temperatures": report.temperatures, "rules": report.rules, "k": report.k,
                   "max_new_tokens": report.max_new_tokens, "seeds": report.seeds, "bootstrap": report.bootstrap,
                   "coverage": report.coverage, "ci_level": report.ci_level, "tau_count": report.tau_count,
                   "cost": dataclasses.asdict(report.cost), "cells": cells, "costs": costs},
    })


def load_report(path: Path, inputs: dict[str, Any]) -> EvalReport | None:
    """The report kept at `path` if it was made from exactly `inputs`, else None."""
    if not path.is_file():
        return None
    try:
        state = read_json(path)
        if state.get("format") != STORED_FORMAT or state.get("inputs") != inputs:
            return None
        r = dict(state["report"])
        cells = {(c["key"][0], float(c["key"][1]), c["key"][2], c["key"][3]): Cell(
            [PromptReplay(tok, rnd, *(np.array(v, dtype=np.float64) for v in rest)) for tok, rnd, *rest
             in c["prompts"]]) for c in r.pop("cells")}
        costs = {(c["key"][0], float(c["key"][1])): Costs(tuple(c["passes"]), c["propose_per_token"], c["overhead"],
                                                         c["plain_per_token"]) for c in r.pop("costs")}
        report = EvalReport(**{**r, "drafts": [tuple(d) for d in r["drafts"]], "cost": Cost(**r["cost"]),
                               "cells": cells, "costs": costs})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("kept evaluation %s is unusable (%s); replaying again", path, exc)
        return None
    log.info("reusing the evaluation kept in %s (same drafts, target and settings)", path)
    return report
