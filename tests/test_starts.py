"""Sameness across runs: train.start_cache reuses a fitted start (token map + target init) only where it is the
same start, and a moved output folder still holds the same documents (resume and start reuse accept it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tests.test_train import make_docs, tiny_config, write_features

from lkspec.data.combined import CombinedSource
from lkspec.data.features import FeatureStore
from lkspec.drafts import load_draft
from lkspec.errors import LkspecError
from lkspec.io import read_json
from lkspec.targets import Target
from lkspec.train import train
from lkspec.train.setup import check_same_data
from lkspec.train.starts import WEIGHTS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def features(tiny_target: Target, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_features(tmp_path_factory.mktemp("features") / "f", tiny_target.identity, make_docs(tiny_target))


def run(features: Path, target_dir: Path, target: Target, out: Path, cache: Path | None, **extra: object) -> Path:
    opts = {"draft.init": "target", "draft.inner_dim": 2 * target.hidden_size, "draft.vocab_size": 40,
            "epochs": 1, "max_steps": 2, "loss.name": "lk_hybrid", **extra}
    if cache is not None:
        opts["start_cache"] = str(cache)
    train(tiny_config(features, target_dir, **opts), out, target=target)
    return out


def start_notes(run_dir: Path) -> dict:
    return read_json(run_dir / "config.json")["lkspec"]["draft_start"]


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = load_draft(a / "last").state_dict(), load_draft(b / "last").state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_kept_start_trains_exactly_like_a_fresh_fit(tiny_target: Target, tiny_target_dir: Path, features: Path,
                                                      tmp_path: Path) -> None:
    cache = tmp_path / "starts"
    first = run(features, tiny_target_dir, tiny_target, tmp_path / "kl", cache, **{"loss.name": "kl"})
    assert "start_cache" not in start_notes(first) and len(list(cache.iterdir())) == 1
    reused = run(features, tiny_target_dir, tiny_target, tmp_path / "lk", cache)
    assert start_notes(reused)["start_cache"] == str(next(cache.iterdir()))
    assert start_notes(reused)["vocab"] == start_notes(first)["vocab"]
    fresh = run(features, tiny_target_dir, tiny_target, tmp_path / "lk-fresh", None)
    assert same_weights(reused, fresh)  # the reused start is bit for bit the fit the run would have made

    # another seed or other draft options are other starts
    run(features, tiny_target_dir, tiny_target, tmp_path / "s1", cache, seed=1)
    run(features, tiny_target_dir, tiny_target, tmp_path / "v", cache, **{"draft.vocab_size": 48})
    assert len(list(cache.iterdir())) == 3


def test_a_damaged_start_is_fitted_again(tiny_target: Target, tiny_target_dir: Path, features: Path,
                                         tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "starts"
    run(features, tiny_target_dir, tiny_target, tmp_path / "a", cache)
    kept = next(cache.iterdir()) / WEIGHTS
    kept.write_bytes(kept.read_bytes()[:100])
    again = run(features, tiny_target_dir, tiny_target, tmp_path / "b", cache)
    assert "unusable" in caplog.text and "start_cache" not in start_notes(again)
    assert same_weights(again, run(features, tiny_target_dir, tiny_target, tmp_path / "c", None))
    assert "start_cache" in start_notes(run(features, tiny_target_dir, tiny_target, tmp_path / "d", cache))


def test_a_start_cache_that_cannot_be_written_costs_a_warning_not_the_run(
        tiny_target: Target, tiny_target_dir: Path, features: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    in_the_way = tmp_path / "starts"
    in_the_way.write_text("not lkspec's")  # a file where the cache folder should go
    done = run(features, tiny_target_dir, tiny_target, tmp_path / "a", in_the_way)
    assert "could not keep the fitted start" in caplog.text and in_the_way.read_text() == "not lkspec's"
    assert same_weights(done, run(features, tiny_target_dir, tiny_target, tmp_path / "b", None))


def test_a_moved_output_folder_holds_the_same_documents(tiny_target: Target, tiny_target_dir: Path,
                                                        tmp_path: Path) -> None:
    """The pipeline's two data parts, read as one, record their own paths; moving the folder must not make a
    resume refuse the very documents it started on (it said they "hold different ones")."""
    docs = make_docs(tiny_target, 16)
    here = tmp_path / "here"
    for name, part in (("a", docs[:8]), ("b", docs[8:])):
        write_features(here / name, tiny_target.identity, part, shards=1)

    def both(root: Path) -> CombinedSource:
        return CombinedSource([FeatureStore(root / "a"), FeatureStore(root / "b")])

    run_dir = tmp_path / "run"
    cfg = tiny_config(here / "a", tiny_target_dir, epochs=2, max_steps=2, checkpoint_every=1)
    train(cfg, run_dir, store=both(here), target=tiny_target)
    moved = tmp_path / "moved"
    shutil.copytree(here, moved)
    shutil.rmtree(here)
    check_same_data(run_dir, both(moved))  # raised before
    done = train(cfg.model_copy(update={"max_steps": 4}), run_dir, store=both(moved), target=tiny_target, resume=True)
    assert done.step == 4
    with pytest.raises(LkspecError, match="hold different ones"):
        check_same_data(run_dir, CombinedSource([FeatureStore(moved / "b"), FeatureStore(moved / "a")]))
