"""Feature extraction: equality with a fresh forward, exact resume, full disk, budget, online mode, refusals."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

import lkspec
import lkspec.io
from helpers import kill_at_marker
from lkspec.data.features import (
    INDEX,
    FeatureStore,
    OnlineFeatures,
    estimate_bytes,
    extract_features,
    open_features,
    plan_shards,
)
from lkspec.data.prompts import load_prompts
from lkspec.data.regenerate import META, RegenConfig, load_tokens, read_meta, regenerate
from lkspec.errors import LkspecError
from lkspec.targets import Target
from lkspec.train.batching import survey

SMALL = {"batch_size": 3, "shard_tokens": 150}  # several shards from a handful of short documents


def _prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Tell me about the sea {i} " + "and the stars "
                                        * (i % 4)}) + "\n" for i in range(n)))
    return path


@pytest.fixture(scope="module")
def tokens(tiny_target: Target, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tokens")
    ps = load_prompts(source=str(_prompts(root / "p.jsonl", 10)))
    regenerate(tiny_target, ps, root / "tok", RegenConfig(max_new_tokens=10, batch_size=4), progress=False)
    return root / "tok"


def _docs(store) -> dict[int, tuple]:
    return {d.row: (d.input_ids.cpu(), d.loss_mask.cpu(), d.hidden.cpu()) for d in store.iter_docs()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(all(torch.equal(x, y) for x, y in zip(a[k], b[k], strict=True)) for k in a)


def test_shards_equal_fresh_forward(tiny_target: Target, tokens: Path, tmp_path: Path) -> None:
    t = tiny_target
    ds, _ = load_tokens(tokens)
    store = extract_features(t, tokens, tmp_path / "f", dtype="float32", progress=False, **SMALL)
    assert len(store.shards) > 2 and store.num_docs == len(ds)
    assert store.num_tokens == sum(len(r) for r in ds["input_ids"])
    assert store.num_loss_tokens == sum(sum(m) for m in ds["loss_mask"])
    assert store.meta["key"] and store.meta["settings"]["max_new_tokens"] == 10
    for doc in store.iter_docs():
        row = ds[doc.row]
        assert doc.input_ids.tolist() == row["input_ids"] and doc.loss_mask.tolist() == [bool(m) for m in
                                                                                         row["loss_mask"]]
        fresh = t.hidden_states(torch.tensor([row["input_ids"]]))[0]
        torch.testing.assert_close(doc.hidden, fresh, rtol=1e-4, atol=1e-5)
        # the full-vocabulary normaliser of the stored states, for truncated draft vocabularies
        torch.testing.assert_close(doc.target_lse, torch.logsumexp(t.logits_from_hidden(doc.hidden), -1))
    bf16 = extract_features(t, tokens, tmp_path / "b", progress=False, **SMALL)  # default storage: bfloat16
    assert bf16.dtype == torch.bfloat16
    assert {f.stat().st_size for f in (tmp_path / "b").glob("*.safetensors")} != set()
    size = lambda d: sum(f.stat().st_size for f in (tmp_path / d).glob("*.safetensors"))  # noqa: E731
    assert size("b") < 0.6 * size("f")  # 16-bit storage roughly halves the disk
    for a, b in zip(store.iter_docs(), bf16.iter_docs(), strict=True):
        torch.testing.assert_close(b.hidden.float(), a.hidden, rtol=1e-2, atol=1e-2)


def test_interrupted_extraction_resumes_identically(tiny_target: Target, tokens: Path, tmp_path: Path) -> None:
    whole = extract_features(tiny_target, tokens, tmp_path / "whole", dtype="float32", progress=False, **SMALL)

    class KilledError(RuntimeError):
        pass

    def kill(s: int) -> None:
        if s == 1:
            raise KilledError

    with pytest.raises(KilledError):
        extract_features(tiny_target, tokens, tmp_path / "cut", dtype="float32", progress=False,
                         on_shard_done=kill, **SMALL)
    assert len(FeatureStore(tmp_path / "cut").shards) == 2
    ran: list[int] = []
    cut = extract_features(tiny_target, tokens, tmp_path / "cut", dtype="float32", progress=False,
                           on_shard_done=ran.append, **SMALL)
    assert ran == list(range(2, len(whole.shards)))  # only the missing shards were computed
    assert cut.shards == whole.shards and _same(_docs(cut), _docs(whole))
    again: list[int] = []
    extract_features(tiny_target, tokens, tmp_path / "cut", dtype="float32", progress=False,
                     on_shard_done=again.append, **SMALL)
    assert again == []  # complete: skipped


KILL_SCRIPT = """
import time, torch
torch.set_num_threads({threads})
from lkspec.targets import load_target
from lkspec.data.features import extract_features

def hook(s):
    if s == 1:
        print("SHARD-1-DONE", flush=True)
        time.sleep(120)

extract_features(load_target({target!r}, device="cpu"), {tokens!r}, {out!r}, dtype="float32", progress=False,
                 on_shard_done=hook, batch_size=3, shard_tokens=150)
"""


def test_sigkilled_extraction_resumes_identically(tiny_target: Target, tiny_target_dir: Path, tokens: Path,
                                                  tmp_path: Path) -> None:
    """A process killed outright (no exception handler runs) leaves a store that resumes to the same shards."""
    script = KILL_SCRIPT.format(threads=torch.get_num_threads(), target=str(tiny_target_dir), tokens=str(tokens),
                                out=str(tmp_path / "cut"))
    kill_at_marker(script, "SHARD-1-DONE")
    assert len(FeatureStore(tmp_path / "cut").shards) == 2
    ran: list[int] = []
    cut = extract_features(tiny_target, tokens, tmp_path / "cut", dtype="float32", progress=False,
                           on_shard_done=ran.append, **SMALL)
    whole = extract_features(tiny_target, tokens, tmp_path / "whole", dtype="float32", progress=False, **SMALL)
    assert ran == list(range(2, len(whole.shards)))
    assert cut.shards == whole.shards and _same(_docs(cut), _docs(whole))


def test_full_disk_keeps_earlier_shards(tiny_target: Target, tokens: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = lkspec.io.save_file
    calls = {"n": 0}

    def save_then_fill_disk(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:  # the third shard: half written, then the disk is full
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(lkspec.io, "save_file", save_then_fill_disk)
    with pytest.raises(LkspecError, match=r"disk full while writing shard 2 .* the 2 earlier shards are intact") as e:
        extract_features(tiny_target, tokens, tmp_path / "f", dtype="float32", progress=False, **SMALL)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [INDEX, "shard-00000.safetensors",
                                                                  "shard-00001.safetensors"]
    store = FeatureStore(tmp_path / "f")
    assert len(store.shards) == 2 and len(list(store.iter_docs())) == store.num_docs
    monkeypatch.setattr(lkspec.io, "save_file", real_save)
    resumed = extract_features(tiny_target, tokens, tmp_path / "f", dtype="float32", progress=False, **SMALL)
    whole = extract_features(tiny_target, tokens, tmp_path / "w", dtype="float32", progress=False, **SMALL)
    assert _same(_docs(resumed), _docs(whole))

    def index_write_fails(path, obj):
        if obj["shards"]:  # the index update after the first shard
            raise OSError(errno.ENOSPC, "No space left on device")
        lkspec.io.write_json(path, obj)

    monkeypatch.setattr("lkspec.data.features.write_json", index_write_fails)
    with pytest.raises(LkspecError, match="disk full"):
        extract_features(tiny_target, tokens, tmp_path / "g", dtype="float32", progress=False, **SMALL)
    assert not list((tmp_path / "g").glob("shard-*"))  # a shard the index never listed is removed at once


def test_token_budget_and_estimate(tiny_target: Target, tokens: Path, tmp_path: Path) -> None:
    ds, _ = load_tokens(tokens)
    lengths = [len(r) for r in ds["input_ids"]]
    store = extract_features(tiny_target, tokens, tmp_path / "f", progress=False, max_tokens=200, **SMALL)
    rows = sorted(d.row for d in store.iter_docs())
    assert rows == list(range(len(rows))) and len(rows) < len(lengths)  # a prefix in dataset order
    assert store.num_tokens >= 200 and store.num_tokens - lengths[rows[-1]] < 200
    bigger = extract_features(tiny_target, tokens, tmp_path / "f", progress=False, max_tokens=400, **SMALL)
    assert bigger.num_tokens >= 400 and sorted(d.row for d in bigger.iter_docs())[: len(rows)] == rows
    assert estimate_bytes(1000, 4096, "bfloat16") == 1000 * (4096 * 2 + 9)
    assert estimate_bytes(10, 8, "float32") == 10 * 41
    assert estimate_bytes(10, 8, "float32", num_aux=3) == 10 * (4 * 32 + 9)  # EAGLE-3's three layers more
    plan = plan_shards([5, 9, 1, 7, 3], batch_size=2, shard_tokens=10)
    assert plan == [[[1, 3]], [[0, 4], [2]]]  # longest first; a shard closes after the batch that fills it


def test_online_mode_yields_the_same_docs(tiny_target: Target, tokens: Path, tmp_path: Path) -> None:
    store = extract_features(tiny_target, tokens, tmp_path / "f", dtype="float32", progress=False, **SMALL)
    online = OnlineFeatures(tiny_target, tokens, dtype="float32", **SMALL)
    assert online.identity == store.identity and online.hidden_size == store.hidden_size
    assert (online.num_docs, online.num_tokens, online.num_loss_tokens) == (store.num_docs, store.num_tokens,
                                                                            store.num_loss_tokens)
    assert [{**s, "file": None} for s in store.shards] == online.shards
    for seed, ids in ((None, None), (3, None), (7, [2, 0])):
        a, b = list(store.iter_docs(seed=seed, shard_ids=ids)), list(online.iter_docs(seed=seed, shard_ids=ids))
        assert [d.row for d in a] == [d.row for d in b]
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.loss_mask, y.loss_mask)
            assert torch.equal(x.hidden, y.hidden)
    native = OnlineFeatures(tiny_target, tokens, **SMALL)
    assert next(native.iter_docs()).hidden.dtype == tiny_target.dtype
    assert isinstance(open_features(tmp_path / "f"), FeatureStore)
    assert isinstance(open_features(tokens, tiny_target, **SMALL), OnlineFeatures)
    assert isinstance(open_features(f"online:{tokens}", tiny_target), OnlineFeatures)
    with pytest.raises(LkspecError, match="online features need the target"):
        open_features(tokens)
    with pytest.raises(LkspecError, match="neither a feature directory"):
        open_features(tmp_path)


def test_doc_masks_need_no_hidden_states(tiny_target: Target, tokens: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Both sources list (row, loss_mask) in iter_docs order without loading or computing a hidden state."""
    store = extract_features(tiny_target, tokens, tmp_path / "f", dtype="float32", progress=False, **SMALL)
    online = OnlineFeatures(tiny_target, tokens, dtype="float32", **SMALL)
    want = [(d.row, d.loss_mask) for d in store.iter_docs()]

    def no_forward(*args, **kwargs):
        raise AssertionError("iter_doc_masks ran the target")

    monkeypatch.setattr(FeatureStore, "load_shard", no_forward)
    monkeypatch.setattr(type(tiny_target), "hidden_states", no_forward)
    for source in (store, online):
        got = list(source.iter_doc_masks())
        assert [r for r, _ in got] == [r for r, _ in want]
        assert all(m.dtype == torch.bool and torch.equal(m, w) for (_, m), (_, w) in zip(got, want, strict=True))
    assert survey(online, 3) == survey(store, 3)


def test_refuses_other_targets_and_unfinished_data(tiny_target: Target, tokens: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    shutil.copytree(tokens, foreign)
    meta = read_meta(foreign)
    meta["target"] = {**meta["target"], "name": "other-model", "hidden_size": 4096}
    (foreign / META).write_text(json.dumps(meta))
    for call in (lambda: extract_features(tiny_target, foreign, tmp_path / "f", progress=False),
                 lambda: OnlineFeatures(tiny_target, foreign)):
        with pytest.raises(LkspecError, match=r"tokens dataset .* was made for target 'other-model'") as err:
            call()
        assert "\n" not in str(err.value)
    assert not (tmp_path / "f").exists()
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tokens, unfinished)
    (unfinished / META).write_text(json.dumps({**read_meta(tokens), "complete": False}))
    with pytest.raises(LkspecError, match="is unfinished"):
        extract_features(tiny_target, unfinished, tmp_path / "f", progress=False)
    extract_features(tiny_target, tokens, tmp_path / "f2", progress=False, **SMALL)
    changed = tmp_path / "changed"
    shutil.copytree(tokens, changed)
    (changed / META).write_text(json.dumps({**read_meta(tokens), "counts": {"rows": 1}}))
    with pytest.raises(LkspecError, match="holds features of another tokens dataset"):
        extract_features(tiny_target, changed, tmp_path / "f2", progress=False, **SMALL)
    with pytest.raises(LkspecError, match="unknown feature dtype 'int8'"):
        extract_features(tiny_target, tokens, tmp_path / "f3", dtype="int8", progress=False)


@pytest.mark.slow
def test_embedded_features_equal_fresh_forward(embedded_target: Target, tmp_path: Path) -> None:
    t = embedded_target
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ["Name a color.", "What is the capital of "
                                                                       "France? One word.", "Count to five."]))
    regenerate(t, load_prompts(source=str(path)), tmp_path / "tok", RegenConfig(max_new_tokens=6, batch_size=3),
               progress=False)
    store = extract_features(t, tmp_path / "tok", tmp_path / "f", dtype="float32", batch_size=3, progress=False)
    assert store.num_docs == 3 and store.identity == t.identity
    for doc in store.iter_docs():
        fresh = t.hidden_states(doc.input_ids[None])[0]
        torch.testing.assert_close(doc.hidden, fresh, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(t.logits_from_hidden(doc.hidden[None]), t.logits(doc.input_ids[None]),
                                   rtol=1e-4, atol=1e-3)


def test_cli_all_skips_finished_stages_and_documents_flags(tiny_target_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import typer.main

    from lkspec.cli import app, main

    prompts = _prompts(tmp_path / "p.jsonl", 4)
    args = ["data", "all", "--target", str(tiny_target_dir), "--prompts", str(prompts), "--out", str(tmp_path / "d"),
            "--max-new-tokens", "5", "--gen-batch-size", "2", "--dtype", "float16", "--quiet"]
    main(args)
    store = FeatureStore(tmp_path / "d" / "features")
    assert store.num_docs == 4 and store.dtype == torch.float16
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "d").rglob("*") if p.is_file()}
    main(args)  # everything finished: nothing is rewritten
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "d").rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_:
        main([*args[:-1], "--temperature", "0.5"])
    assert exit_.value.code == 2 and "temperature 1.0 != 0.5" in capsys.readouterr().err
    group = typer.main.get_command(app).commands["data"]
    for name in ("prompts", "regenerate", "features", "all"):
        cmd = group.commands[name]
        assert cmd.help
        undocumented = [p.name for p in cmd.params if p.name != "help" and not getattr(p, "help", None)]
        assert undocumented == [], f"lkspec data {name}: {undocumented}"


def test_damaged_shard_is_named_and_re_extracted(tiny_target: Target, tokens: Path, tmp_path: Path) -> None:
    whole = extract_features(tiny_target, tokens, tmp_path / "f", dtype="float32", progress=False, **SMALL)
    before = {row: tuple(t.clone() for t in d) for row, d in _docs(whole).items()}  # shards are memory-mapped
    shard = tmp_path / "f" / "shard-00001.safetensors"
    size = shard.stat().st_size
    with shard.open("r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(LkspecError, match=r"shard-00001\.safetensors is truncated or corrupt .*rerun the `lkspec "
                                          r"data features` command") as e:
        list(FeatureStore(tmp_path / "f").iter_docs())
    assert "\n" not in str(e.value)
    again = extract_features(tiny_target, tokens, tmp_path / "f", dtype="float32", progress=False, **SMALL)
    assert _same(_docs(again), before)  # the damaged shard's documents were extracted again, the rest kept
    assert len({s["file"] for s in again.shards}) == len(again.shards)


def test_features_never_delete_files_in_a_foreign_folder(tiny_target: Target, tokens: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "shard-00000.safetensors").write_bytes(b"my own file")
    (mine / ".shard-00001.tmp").write_bytes(b"also mine")
    with pytest.raises(LkspecError, match="exists and is not a feature directory; choose a new output directory"):
        extract_features(tiny_target, tokens, mine, dtype="float32", progress=False, **SMALL)
    assert sorted(p.name for p in mine.iterdir()) == [".shard-00001.tmp", "shard-00000.safetensors"]


def test_real_full_disk_is_one_line_and_keeps_finished_shards(tiny_target: Target, tokens: Path, tmp_path: Path,
                                                              small_disk) -> None:
    whole = extract_features(tiny_target, tokens, tmp_path / "w", dtype="float32", progress=False, **SMALL)
    need = sum(p.stat().st_size for p in (tmp_path / "w").iterdir())
    disk = small_disk(max(4096 * 4, need // 2 // 4096 * 4096))
    with pytest.raises(LkspecError, match=r"disk full while writing shard \d+ .* earlier shards are intact") as e:
        extract_features(tiny_target, tokens, disk / "f", dtype="float32", progress=False, **SMALL)
    assert "\n" not in str(e.value)
    kept = FeatureStore(disk / "f")
    assert 0 < len(kept.shards) < len(whole.shards) and len(list(kept.iter_docs())) == kept.num_docs
