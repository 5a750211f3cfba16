"""Prompt sources: the truncated ShareGPT stream, JSONL with bad rows, HF datasets, cleaning and order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lkspec.data.prompts import (
    PromptConfig,
    get_path,
    iter_json_array,
    load_prompts,
    sharegpt_path,
    write_prompts_jsonl,
)
from lkspec.errors import LkspecError


def _conv(i: int, first: str = "human") -> dict:
    return {"id": f"c{i}", "conversations": [{"from": first, "value": f"question {i} ü"},
                                             {"from": "gpt", "value": f"answer {i} " + "x" * 50}]}


def test_stream_decoder_stops_at_truncation(tmp_path: Path) -> None:
    full = json.dumps([_conv(i) for i in range(5)], indent=2)
    (tmp_path / "full.json").write_text(full)
    cut = full[: full.index('"c3"') + 30]  # file ends inside the fourth record
    (tmp_path / "cut.json").write_text(cut)
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut)
    for chunk in (7, 64, 1 << 20):  # tiny chunks force the sliding buffer to grow and slide
        assert [c["id"] for c in iter_json_array(tmp_path / "full.json", chunk)] == [f"c{i}" for i in range(5)]
        assert [c["id"] for c in iter_json_array(tmp_path / "cut.json", chunk)] == ["c0", "c1", "c2"]
    (tmp_path / "nums.json").write_text("[12345, 6789, true, 3")
    assert list(iter_json_array(tmp_path / "nums.json", 3)) == [12345, 6789, True]
    ps = load_prompts(source=str(tmp_path / "cut.json"), shuffle=False)  # a user's own ShareGPT-style file
    assert [(r.id, r.messages[0]["content"]) for r in ps.records] == [(f"c{i}", f"question {i} ü") for i in range(3)]


def test_stream_decoder_equals_json_loads_past_odd_bytes(tmp_path: Path) -> None:
    """Invalid UTF-8 and integers beyond 64 bits do not end the stream; a number cut by the end is dropped."""
    (tmp_path / "odd.json").write_bytes(b'["a\xffb", 123456789012345678901234567890, 2.5, {"x": [0.1]}, '
                                        b'"\xc3\xa9", 3.1')
    want = ["a\ufffdb", 123456789012345678901234567890, 2.5, {"x": [0.1]}, "\u00e9"]
    for chunk in (1, 5, 1 << 20):
        got = list(iter_json_array(tmp_path / "odd.json", chunk))
        assert got == want and [type(v) for v in got] == [type(v) for v in want]
    (tmp_path / "obj.json").write_text('  {"a": 1}')
    with pytest.raises(LkspecError, match="does not start with a JSON array"):
        list(iter_json_array(tmp_path / "obj.json"))


def test_bundled_sharegpt_is_truncated_and_streams() -> None:
    path = sharegpt_path()
    with open(path, "rb") as f:
        f.seek(-200, 2)
        assert not f.read().rstrip().endswith(b"]")  # really cut off: json.load would fail
    ps = load_prompts(PromptConfig(dedupe=False, shuffle=False))
    assert ps.stats["read"] == 17671  # every complete conversation before the cut
    assert 11100 <= len(ps.records) <= 11200  # ~11.1K non-empty first-turn human prompts
    first = ps.records[0]
    assert first.id == "sharegpt/QWJhYvA_0" and first.messages[-1]["role"] == "user"
    assert first.messages[-1]["content"].startswith("Summarize the main ideas of Jeff Walker")
    assert all(r.messages[-1]["content"].strip() and r.response is None for r in ps.records)
    assert len({r.id for r in ps.records}) == len(ps.records)
    deduped = load_prompts(limit=50, seed=1)
    assert deduped.stats["duplicate"] > 0 and len(deduped.records) == 50


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_fields_malformed_rows_and_strict(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "q": {"text": "first prompt"}},
        "{not json",
        [1, 2],
        {"id": "b", "q": {"text": "second prompt"}},
        {"id": "c", "other": "no prompt here"},
    ])
    ps = load_prompts(source=str(path), prompt_field="q.text", shuffle=False)
    assert [r.id for r in ps.records] == ["a", "b"]
    assert ps.records[0].messages == [{"role": "user", "content": "first prompt"}]
    assert ps.stats["malformed"] == 2 and ps.stats["read"] == 4  # bad JSON is not even a row
    assert ps.stats["no_prompt"] == 1  # an object without the prompt field is missing it, not malformed
    with pytest.raises(LkspecError, match=r"p\.jsonl:2: not valid JSON") as err:
        load_prompts(source=str(path), prompt_field="q.text", strict=True)
    assert "\n" not in str(err.value)
    ok = _write_jsonl(tmp_path / "ok.jsonl", [{"q": {"text": "x"}}, {"nothing": 1}])
    with pytest.raises(LkspecError, match=r"ok\.jsonl:2: no prompt found"):
        load_prompts(source=str(ok), prompt_field="q.text", strict=True)


def test_auto_fields_chats_and_indexed_paths(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
        {"conversations": [{"from": "human", "value": "sharegpt style"}]},
        {"conversations": [{"from": "gpt", "value": "opens with the assistant"}]},
        {"instruction": "alpaca style"},
    ])
    ps = load_prompts(source=str(path), shuffle=False)
    assert [r.messages for r in ps.records] == [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": "sharegpt style"}],
        [{"role": "user", "content": "alpaca style"}],
    ]
    assert ps.records[0].id == "c.jsonl:1" and ps.stats["no_prompt"] == 1 and ps.stats["malformed"] == 0
    row = {"conversation": [{"content": "p"}], "generated_message": {"content": "r"}}
    assert get_path(row, "conversation[0].content") == get_path(row, "conversation.0.content") == "p"
    assert get_path(row, "conversation[3].content") is None


def test_dedupe_filters_shuffle_limit(tmp_path: Path) -> None:
    rows = [{"id": str(i), "prompt": f"prompt number {i}"} for i in range(30)]
    rows += [{"id": "dup", "prompt": "prompt number 3"}, {"id": "short", "prompt": "hi"},
             {"id": "long", "prompt": "y" * 500}, {"id": "blank", "prompt": "   "}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    ps = load_prompts(source=str(path), min_chars=5, max_chars=100, seed=3)
    assert ps.stats == {"read": 34, "malformed": 0, "no_prompt": 0, "empty": 1, "duplicate": 1, "too_short": 1,
                        "too_long": 1, "kept": 30}
    again = load_prompts(source=str(path), min_chars=5, max_chars=100, seed=3)
    other = load_prompts(source=str(path), min_chars=5, max_chars=100, seed=4)
    ids = [r.id for r in ps.records]
    assert ids == [r.id for r in again.records] and ps.fingerprint == again.fingerprint
    assert ids != [r.id for r in other.records] and sorted(ids) == sorted(r.id for r in other.records)
    assert ids != sorted(ids, key=int)
    limited = load_prompts(source=str(path), min_chars=5, max_chars=100, seed=3, limit=7)
    assert [r.id for r in limited.records] == ids[:7]
    assert len(load_prompts(source=str(path), dedupe=False).records) == 33  # + duplicate, "hi", long
    dup_ids = _write_jsonl(tmp_path / "ids.jsonl", [{"id": "x", "prompt": "a"}, {"id": "x", "prompt": "b"}])
    assert [r.id for r in load_prompts(source=str(dup_ids), shuffle=False).records] == ["x", "x#1"]


def test_empty_prompt_set_is_one_line_error(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "e.jsonl", [{"prompt": "  "}, {"prompt": ""}])
    with pytest.raises(LkspecError, match="is empty after filtering") as err:
        load_prompts(source=str(path))
    assert "\n" not in str(err.value) and "empty 2" in str(err.value)
    with pytest.raises(LkspecError, match="does not exist"):
        load_prompts(source=str(tmp_path / "missing.jsonl"))
    with pytest.raises(LkspecError, match="limit must be >= 1"):
        load_prompts(source=str(path), limit=0)


def test_export_roundtrip(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "r.jsonl", [{"id": f"q{i}", "prompt": f"question {i}"} for i in range(6)])
    ps = load_prompts(source=str(path), seed=2)
    out = write_prompts_jsonl(ps, tmp_path / "export.jsonl")
    back = load_prompts(source=str(out), shuffle=False)
    assert [(r.id, r.messages) for r in back.records] == [(r.id, r.messages) for r in ps.records]


def test_hf_dataset_with_target_responses(tmp_path: Path) -> None:
    """A local stand-in for nebius/...-Infinity-Instruct-0625: prompts and the target's own responses."""
    import datasets

    rows = {"conversation": [[{"role": "user", "content": f"prompt {i}"}] for i in range(4)],
            "generated_message": [{"role": "assistant", "content": f"response {i}"} for i in range(4)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "nebius"))
    ps = load_prompts(source=str(tmp_path / "nebius"), prompt_field="conversation[0].content",
                      response_field="generated_message.content", shuffle=False)
    assert [(r.messages[0]["content"], r.response) for r in ps.records] == [
        (f"prompt {i}", f"response {i}") for i in range(4)]
    assert ps.records[0].id.endswith("/0")
    ignored = load_prompts(source=str(tmp_path / "nebius"), response_field="generated_message.content",
                           use_responses=False)
    assert all(r.response is None for r in ignored.records)
    preset = PromptConfig(source="nebius/Llama-3.1-8B-Instruct-Infinity-Instruct-0625")
    from lkspec.data.prompts import apply_presets

    assert apply_presets(preset).response_field == "generated_message.content"
    assert apply_presets(PromptConfig(source="BAAI/Infinity-Instruct")).hf_config == "0625"


def test_unreachable_hub_is_one_line_error() -> None:
    with pytest.raises(LkspecError, match="could not load Hugging Face dataset") as err:
        load_prompts(source="hf:lkspec-test/does-not-exist")
    assert "\n" not in str(err.value)
    with pytest.raises(LkspecError, match="is not 'sharegpt'"):
        load_prompts(source="not a source")


def test_jsonl_edge_cases_are_counted_or_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 13: a non-UTF-8 byte, a deeply nested line, an array saved as .jsonl, rows without the field."""
    p = tmp_path / "e.jsonl"
    p.write_bytes(b'{"prompt": "fine one"}\n{"prompt": "bad \xff byte"}\n' + b"[" * 100_000 + b"\n"
                  + b'{"note": "no prompt field"}\n{"prompt": "fine two"}\n')
    with caplog.at_level("WARNING"):
        ps = load_prompts(source=str(p), shuffle=False)
    assert [r.messages[0]["content"] for r in ps.records] == ["fine one", "fine two"]
    assert (ps.stats["malformed"], ps.stats["no_prompt"]) == (2, 1)
    assert "without a prompt (their fields: note); set --prompt-field" in caplog.text
    with pytest.raises(LkspecError, match=r"e\.jsonl:2: not UTF-8; fix the row or drop --strict"):
        load_prompts(source=str(p), strict=True)
    p.write_bytes(b'{"prompt": "ok"}\n' + b"[" * 100_000 + b"\n")
    with pytest.raises(LkspecError, match=r"e\.jsonl:2: nested too deeply"):
        load_prompts(source=str(p), strict=True)
    arr = tmp_path / "a.jsonl"
    arr.write_text('[\n  {"prompt": "x"},\n  {"prompt": "y"}\n]\n')
    with pytest.raises(LkspecError, match=r"a\.jsonl holds a JSON array, not JSON Lines .* rename it to a\.json"):
        load_prompts(source=str(arr))


def test_bench_source_reads_past_the_evaluated_prompts() -> None:
    from lkspec.data.benchmarks import load_benchmark

    records = load_benchmark("gsm8k")
    ps = load_prompts(source="bench:gsm8k", skip=40, shuffle=False)
    assert len(ps.records) == len(records) - 40
    assert ps.records[0].messages == records[40].messages  # the published order, past the first 40
    assert not {r.messages[-1]["content"] for r in ps.records} & {r.messages[-1]["content"] for r in records[:40]}
    both = load_prompts(source="bench:human-eval,gsm8k", skip=90, shuffle=False).records
    assert [r.id.split("/")[0] for r in both] == ["humaneval"] * (164 - 90) + ["gsm8k"] * (100 - 90)  # per benchmark
    with pytest.raises(LkspecError, match="unknown benchmark 'nope'"):
        load_prompts(source="bench:nope")
    with pytest.raises(LkspecError, match="empty after filtering"):
        load_prompts(source="bench:gsm8k", skip=1000)
