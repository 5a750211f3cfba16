"""Regeneration: the tokens dataset's layout and loss mask, EOS handling, exact resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from helpers import kill_at_marker
from lkspec.data.prompts import PromptRecord, load_prompts
from lkspec.data.regenerate import META, PARTS, RegenConfig, load_tokens, read_meta, regenerate
from lkspec.errors import LkspecError
from lkspec.targets import Target, load_target

TOPICS = ["the sea", "the quick brown fox", "a poem about the stars and the night sky", "clips",
          "def add(a, b)", "friends in April and then in May", "the lazy dog", "stars"]


def write_prompt_file(path: Path, n: int) -> Path:
    rows = [{"id": f"p{i}", "prompt": f"Question {i}: tell me about {TOPICS[i % len(TOPICS)]}" + " please" * (i % 3)}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def eos_target(tiny_target_dir: Path) -> Target:
    """The tiny target with a boosted EOS row, so responses end at EOS and at the limit in one batch."""
    t = load_target(tiny_target_dir, device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        t.model.lm_head.weight[t.eos_token_ids[0]] = torch.randn(t.hidden_size, generator=g) * 0.6
    return t


def rows(path: Path) -> list[dict]:
    return list(datasets.load_from_disk(str(path)))


def test_layout_loss_mask_and_eos(eos_target: Target, tmp_path: Path) -> None:
    t = eos_target
    ps = load_prompts(source=str(write_prompt_file(tmp_path / "p.jsonl", 10)), seed=1)
    meta = regenerate(t, ps, tmp_path / "tok", RegenConfig(max_new_tokens=12, batch_size=4), progress=False)
    ds, meta2 = load_tokens(tmp_path / "tok", t.identity)
    assert meta2 == meta and meta["complete"] and not (tmp_path / "tok" / PARTS).exists()
    assert {"prompt_id", "input_ids", "loss_mask"} <= set(ds.column_names)
    assert ds["prompt_id"] == [r.id for r in ps.records]  # rows in prompt order, not batch order
    eos = set(t.eos_token_ids)
    reasons = []
    for rec, row in zip(ps.records, ds, strict=True):
        prompt = t.render_chat(rec.messages)
        n = len(prompt)
        assert row["input_ids"][:n] == prompt and row["num_prompt_tokens"] == n
        response = row["input_ids"][n:]
        assert row["loss_mask"] == [0] * n + [1] * len(response)  # exactly the response
        assert not any(tok in eos for tok in response[:-1])
        if row["finish_reason"] == "eos":
            assert response[-1] in eos and len(response) <= 12
        else:
            assert len(response) == 12 and response[-1] not in eos
        reasons.append(row["finish_reason"])
    assert {"eos", "length"} <= set(reasons)  # both endings were exercised
    c = meta["counts"]
    assert c["rows"] == 10 and c["finished_eos"] == reasons.count("eos")
    assert c["response_tokens"] == sum(sum(r["loss_mask"]) for r in ds)
    assert meta["settings"]["top_k"] == 0 and meta["settings"]["top_p"] == 1.0  # not transformers' top_k=50
    assert meta["target"] == t.identity.model_dump() and meta["prompts"]["config"]["seed"] == 1


def test_determinism_seed_and_rerun_of_finished(eos_target: Target, tmp_path: Path) -> None:
    ps = load_prompts(source=str(write_prompt_file(tmp_path / "p.jsonl", 6)))
    cfg = RegenConfig(max_new_tokens=10, batch_size=3, seed=5)
    regenerate(eos_target, ps, tmp_path / "a", cfg, progress=False)
    regenerate(eos_target, ps, tmp_path / "b", cfg, progress=False)
    regenerate(eos_target, ps, tmp_path / "c", cfg.model_copy(update={"seed": 6}), progress=False)
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    assert rows(tmp_path / "a") != rows(tmp_path / "c")
    before = (tmp_path / "a" / META).stat().st_mtime_ns
    regenerate(eos_target, ps, tmp_path / "a", cfg, progress=False)  # finished: nothing is redone
    assert (tmp_path / "a" / META).stat().st_mtime_ns == before


class KilledError(RuntimeError):
    pass


def test_interrupted_run_resumes_to_identical_dataset(eos_target: Target, tmp_path: Path) -> None:
    ps = load_prompts(source=str(write_prompt_file(tmp_path / "p.jsonl", 11)))
    cfg = RegenConfig(max_new_tokens=10, batch_size=3)
    regenerate(eos_target, ps, tmp_path / "whole", cfg, progress=False)

    def kill_after_batch_1(b: int) -> None:
        if b == 1:
            raise KilledError

    with pytest.raises(KilledError):
        regenerate(eos_target, ps, tmp_path / "cut", cfg, progress=False, on_batch_done=kill_after_batch_1)
    assert sorted(p.name for p in (tmp_path / "cut" / PARTS).iterdir()) == ["part-000000.arrow", "part-000001.arrow"]
    assert not read_meta(tmp_path / "cut")["complete"]
    with pytest.raises(LkspecError, match="is unfinished"):
        load_tokens(tmp_path / "cut")
    done = []
    regenerate(eos_target, ps, tmp_path / "cut", cfg, progress=False, on_batch_done=done.append)
    assert done == [2, 3]  # only the missing batches ran
    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")  # row by row: nothing duplicated or lost
    assert read_meta(tmp_path / "cut")["counts"] == read_meta(tmp_path / "whole")["counts"]


def test_full_disk_keeps_finished_batches(eos_target: Target, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import lkspec.data.regenerate as regen

    ps = load_prompts(source=str(write_prompt_file(tmp_path / "p.jsonl", 6)))
    cfg = RegenConfig(max_new_tokens=6, batch_size=2)
    real = regen._write_part

    def fill_disk_at_batch_1(path: Path, data: dict) -> None:
        if path.name == "part-000001.arrow":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(regen, "_write_part", fill_disk_at_batch_1)
    with pytest.raises(LkspecError, match=r"disk full while writing batch 1 .*: the finished batches are kept") as e:
        regenerate(eos_target, ps, tmp_path / "cut", cfg, progress=False)
    assert "\n" not in str(e.value)
    assert [p.name for p in (tmp_path / "cut" / PARTS).iterdir()] == ["part-000000.arrow"]
    monkeypatch.setattr(regen, "_write_part", real)
    regenerate(eos_target, ps, tmp_path / "cut", cfg, progress=False)
    regenerate(eos_target, ps, tmp_path / "whole", cfg, progress=False)
    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")


KILL_SCRIPT = """
import sys, time, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads({threads})
from lkspec.targets import load_target
from lkspec.data.prompts import load_prompts
from lkspec.data.regenerate import RegenConfig, regenerate
t = load_target({target!r}, device="cpu")
ps = load_prompts(source={prompts!r})

def hook(b):
    if b == 1:
        print("BATCH-1-DONE", flush=True)
        time.sleep(120)

regenerate(t, ps, {out!r}, RegenConfig(max_new_tokens=8, batch_size=2), progress=False, on_batch_done=hook)
"""


def test_sigkilled_run_resumes_to_identical_dataset(tiny_target: Target, tiny_target_dir: Path,
                                                    tmp_path: Path) -> None:
    prompts = write_prompt_file(tmp_path / "p.jsonl", 7)
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), threads=torch.get_num_threads(),
                                target=str(tiny_target_dir), prompts=str(prompts), out=str(tmp_path / "cut"))
    kill_at_marker(script, "BATCH-1-DONE")
    assert len(list((tmp_path / "cut" / PARTS).glob("part-*.arrow"))) == 2
    ps = load_prompts(source=str(prompts))
    cfg = RegenConfig(max_new_tokens=8, batch_size=2)
    regenerate(tiny_target, ps, tmp_path / "cut", cfg, progress=False)
    regenerate(tiny_target, ps, tmp_path / "whole", cfg, progress=False)
    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")


def test_refuses_other_settings_and_targets(tiny_target: Target, eos_target: Target, tmp_path: Path) -> None:
    ps = load_prompts(source=str(write_prompt_file(tmp_path / "p.jsonl", 4)))
    cfg = RegenConfig(max_new_tokens=6, batch_size=2)

    def stop(b: int) -> None:
        raise KilledError

    with pytest.raises(KilledError):
        regenerate(tiny_target, ps, tmp_path / "tok", cfg, progress=False, on_batch_done=stop)
    with pytest.raises(LkspecError, match=r"other settings \(max_new_tokens 6 != 7; seed 0 != 1\)") as err:
        regenerate(tiny_target, ps, tmp_path / "tok", cfg.model_copy(update={"max_new_tokens": 7, "seed": 1}))
    assert "\n" not in str(err.value)
    fewer = load_prompts(source=str(tmp_path / "p.jsonl"), limit=3)
    with pytest.raises(LkspecError, match="prompts_fingerprint"):
        regenerate(tiny_target, fewer, tmp_path / "tok", cfg)
    other = tiny_target.identity.model_copy(update={"name": "other-model", "tokenizer_hash": "f" * 64})
    meta = read_meta(tmp_path / "tok")
    (tmp_path / "tok" / META).write_text(json.dumps({**meta, "target": other.model_dump()}))
    with pytest.raises(LkspecError, match="was made for target 'other-model'"):
        regenerate(tiny_target, ps, tmp_path / "tok", cfg)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(LkspecError, match="is not a tokens dataset"):
        regenerate(tiny_target, ps, tmp_path / "junk", cfg)
    with pytest.raises(LkspecError, match="the prompt set is empty"):
        regenerate(tiny_target, [], tmp_path / "empty", cfg)


def test_long_prompts_skipped_and_counted(tiny_target: Target, tmp_path: Path) -> None:
    ps = load_prompts(source=str(write_prompt_file(tmp_path / "p.jsonl", 5)), shuffle=False)
    lengths = [len(tiny_target.render_chat(r.messages)) for r in ps.records]
    limit = sorted(lengths)[2]
    meta = regenerate(tiny_target, ps, tmp_path / "tok", RegenConfig(max_new_tokens=4, max_prompt_tokens=limit),
                      progress=False)
    kept = [r.id for r, n in zip(ps.records, lengths, strict=True) if n <= limit]
    assert meta["counts"]["skipped_long_prompts"] == 5 - len(kept)
    assert rows(tmp_path / "tok")[0]["prompt_id"] == kept[0] and len(rows(tmp_path / "tok")) == len(kept)
    with pytest.raises(LkspecError, match="every prompt is longer than 1 tokens"):
        regenerate(tiny_target, ps, tmp_path / "none", RegenConfig(max_prompt_tokens=1), progress=False)


def test_given_responses_are_tokenized_not_generated(tiny_target: Target, tmp_path: Path) -> None:
    t = tiny_target
    recs = [PromptRecord(f"n{i}", [{"role": "user", "content": f"prompt {i}"}], "nebius", f"The answer is {i}.")
            for i in range(3)]
    meta = regenerate(t, recs, tmp_path / "tok", RegenConfig(max_new_tokens=64), progress=False)
    assert meta["settings"]["backend"] == "given"
    for rec, row in zip(recs, rows(tmp_path / "tok"), strict=True):
        n = row["num_prompt_tokens"]
        full = t.render_chat([*rec.messages, {"role": "assistant", "content": rec.response}],
                             add_generation_prompt=False)
        assert row["input_ids"] == full[: len(row["input_ids"])]
        assert t.tokenizer.decode(row["input_ids"][n:]) == f"{rec.response}<|im_end|>"  # keeps its EOS
        assert row["loss_mask"] == [0] * n + [1] * (len(row["input_ids"]) - n) and row["finish_reason"] == "eos"
    cut = regenerate(t, recs, tmp_path / "cut", RegenConfig(max_new_tokens=2), progress=False)
    assert cut["counts"]["finished_length"] == 3 and cut["counts"]["response_tokens"] == 6
    mixed = [*recs, PromptRecord("x", [{"role": "user", "content": "q"}], "jsonl")]
    with pytest.raises(LkspecError, match="some prompts carry responses"):
        regenerate(t, mixed, tmp_path / "mixed")


def test_vllm_backend_without_vllm(tiny_target: Target, tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    ps = load_prompts(source=str(write_prompt_file(tmp_path / "p.jsonl", 2)))
    with pytest.raises(LkspecError, match=r"vLLM is not installed: `pip install vllm`.*--backend hf") as err:
        regenerate(tiny_target, ps, tmp_path / "tok", RegenConfig(backend="vllm"), progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_embedded_target_regeneration(embedded_target: Target, tmp_path: Path) -> None:
    """SmolLM2 answers through its chat template; responses stop at <|im_end|> or at the limit."""
    t = embedded_target
    path = tmp_path / "p.jsonl"
    questions = ["What is 2 + 2? Reply with the number only.", "Say hello in French. One word.",
                 "Write a long essay about the history of Rome.", "Is the sky blue? Answer yes or no."]
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": q}) + "\n" for i, q in enumerate(questions)))
    ps = load_prompts(source=str(path), shuffle=False)
    cfg = RegenConfig(max_new_tokens=24, batch_size=4, temperature=0.0)  # greedy: short answers surely stop
    meta = regenerate(t, ps, tmp_path / "tok", cfg, progress=False)
    ds, _ = load_tokens(tmp_path / "tok", t.identity)
    eos = set(t.eos_token_ids)
    assert t.tokenizer.convert_ids_to_tokens(sorted(eos)) == ["<|im_end|>"]
    for rec, row in zip(ps.records, ds, strict=True):
        n = row["num_prompt_tokens"]
        assert row["input_ids"][:n] == t.render_chat(rec.messages)
        assert t.tokenizer.decode(row["input_ids"][:n]).endswith("<|im_start|>assistant\n")
        response = row["input_ids"][n:]
        assert row["loss_mask"] == [0] * n + [1] * len(response)
        assert not any(tok in eos for tok in response[:-1])
        assert (response[-1] in eos) if row["finish_reason"] == "eos" else len(response) == 24
    assert meta["counts"]["finished_eos"] >= 2  # the one-word answers end early
    assert ds[2]["finish_reason"] == "length"  # the essay does not fit in 24 tokens
