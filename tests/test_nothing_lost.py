"""Destructive flags delete only what lkspec wrote; damaged files, full disks and diverging runs are one-line
errors that keep finished work (issue 13; the feature-store cases live in test_features.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import run_cli
from lkspec.drafts import build_draft
from lkspec.errors import LkspecError
from lkspec.export.exporter import export_draft
from lkspec.targets import Target
from lkspec.train import train
from test_train import make_docs, tiny_config, write_features


def _one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]  # progress bars may precede it
    assert len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), r.stderr
    return errors[0]


@pytest.fixture(scope="module")
def features(tiny_target: Target, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_features(tmp_path_factory.mktemp("f") / "f", tiny_target.identity, make_docs(tiny_target, 16))


@pytest.fixture(scope="module")
def draft_dir(tiny_target: Target, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("draft") / "d"
    build_draft("mlp_speculator", seed=0, hidden_size=tiny_target.hidden_size, vocab_size=tiny_target.vocab_size,
                inner_dim=16, num_heads=2).save(d, target=tiny_target.identity)
    return d


# ----- --fresh ---------------------------------------------------------------------------------------
def test_fresh_refuses_a_folder_with_a_foreign_pipeline_json(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "pipeline.json").write_text('{"not": "lkspec"}')
    (d / "precious.txt").write_text("x")
    line = _one_error_line(run_cli("demo", "--quick", "--fresh", "--out", str(d), timeout=120))
    assert "not an lkspec output folder" in line and "choose another --out" in line
    assert sorted(p.name for p in d.iterdir()) == ["pipeline.json", "precious.txt"]


def test_fresh_deletes_only_the_pipeline_outputs_even_through_a_symlink(tmp_path: Path) -> None:
    from lkspec.pipeline import OUTPUTS, RECORD, RECORD_FORMAT, clear_outputs

    real = tmp_path / "real"
    for name in ("data", "runs", "eval", "export"):
        (real / name / "x").mkdir(parents=True)
    (real / "report.md").write_text("r")
    (real / "metrics.png").write_bytes(b"p")
    (real / RECORD).write_text(json.dumps({"format": RECORD_FORMAT, "config": {}}))
    (real / "notes.txt").write_text("mine")
    (real / "mine").mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    assert clear_outputs(link) == ["mine", "notes.txt"]
    assert sorted(p.name for p in real.iterdir()) == ["mine", "notes.txt"] and link.is_symlink()
    assert set(OUTPUTS) >= {"data", "runs", "eval", "export", "report.md", "metrics.png", RECORD}


# ----- export --overwrite ------------------------------------------------------------------------------
def test_export_overwrite_replaces_only_a_previous_export(tiny_target: Target, draft_dir: Path,
                                                          tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "trainer_state").mkdir(parents=True)
    (run / "trainer_state" / "state.json").write_text("{}")
    line = _one_error_line(run_cli("export", "--draft", str(draft_dir), "--out", str(run), "--overwrite"))
    assert "replaces only a previous lkspec export" in line and "choose another --out" in line
    assert (run / "trainer_state" / "state.json").is_file()
    out = tmp_path / "exp"
    export_draft(draft_dir, out)
    (out / "extra.txt").write_text("old")
    export_draft(draft_dir, out, overwrite=True)  # a previous export is replaced whole
    assert not (out / "extra.txt").exists() and (out / "model.safetensors").is_file()


# ----- damaged weights -----------------------------------------------------------------------------------
def test_a_damaged_draft_is_named_by_every_command(draft_dir: Path, tiny_target_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in draft_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    for args in (["export", "--draft", str(bad), "--out", str(tmp_path / "o")],
                 ["eval", str(bad), "--target", str(tiny_target_dir), "--limit", "1", "-b", "gsm8k", "--out",
                  str(tmp_path / "e.json")],
                 ["generate", str(bad), "--target", str(tiny_target_dir), "-p", "hi", "--no-compare"]):
        line = _one_error_line(run_cli(*args))
        assert f"{w} is truncated or corrupt" in line and "re-export it, or retrain it" in line, line


def test_a_damaged_checkpoint_names_the_file_and_the_way_on(tiny_target: Target, tiny_target_dir: Path,
                                                            features: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny_config(features, tiny_target_dir, epochs=1, max_steps=3), run, target=tiny_target)
    opt = run / "trainer_state" / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:1000])
    with pytest.raises(LkspecError, match=rf"{opt} is truncated or corrupt .* --init-from {run}/last"):
        train(tiny_config(features, tiny_target_dir, epochs=1), run, target=tiny_target, resume=True)


# ----- a real full disk at a training checkpoint ------------------------------------------------------
def test_real_full_disk_at_a_checkpoint_is_one_line(tiny_target: Target, tiny_target_dir: Path, features: Path,
                                                    tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        with pytest.raises(LkspecError, match=r"disk is full while saving the .* free space and rerun") as e:
            train(tiny_config(features, tiny_target_dir, epochs=1, **{"draft.inner_dim": 64}), disk / "run",
                  target=tiny_target)
        assert "\n" not in str(e.value)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ----- divergence ----------------------------------------------------------------------------------
def test_a_diverging_run_stops_with_one_line_naming_what_is_kept(tiny_target: Target, tiny_target_dir: Path,
                                                                 features: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(LkspecError, match=r"training diverged at step \d+: the (loss rose|weights' norm grew).* "
                                          r"lower optim\.lr \(now 1e\+09\)") as e:
        train(tiny_config(features, tiny_target_dir, epochs=3, **{"optim.lr": 1e9, "optim.warmup_steps": 0}), run,
              target=tiny_target)
    assert "\n" not in str(e.value)
    ok = train(tiny_config(features, tiny_target_dir, epochs=2), tmp_path / "ok", target=tiny_target)
    assert ok.epoch == 2  # a healthy run with the same data is not flagged


def test_a_draft_whose_weights_start_at_zero_is_not_called_diverged(tiny_target: Target, tiny_target_dir: Path,
                                                                    features: Path, tmp_path: Path) -> None:
    """MEDUSA over the target's frozen head trains only zero-initialised blocks: a norm of 0 is not a baseline."""
    cfg = tiny_config(features, tiny_target_dir, epochs=1, **{
        "draft.arch": "medusa", "draft.inner_dim": None, "draft.init": "target", "draft.freeze": True,
        "loss.name": "kl"})
    res = train(cfg, tmp_path / "run", target=tiny_target)
    assert res.epoch == 1


def test_nan_features_do_not_suggest_a_checkpoint_that_does_not_exist(tiny_target: Target, tiny_target_dir: Path,
                                                                      tmp_path: Path) -> None:
    docs = make_docs(tiny_target, 12)
    for d in docs:
        d.hidden = torch.full_like(d.hidden, float("nan"))
    f = write_features(tmp_path / "nan", tiny_target.identity, docs)
    with pytest.raises(LkspecError, match="non-finite at step 1") as e:
        train(tiny_config(f, tiny_target_dir, **{"draft.init": "random"}), tmp_path / "run", target=tiny_target)
    assert "no checkpoint was written yet" in str(e.value) and "--init-from" not in str(e.value)


# ----- clean output ------------------------------------------------------------------------------------
def test_eval_and_generate_print_no_stray_future_warnings(draft_dir: Path, tiny_target_dir: Path,
                                                          tmp_path: Path) -> None:
    env = {"LKSPEC_CACHE": str(tmp_path / "cache")}
    runs = [run_cli("eval", str(draft_dir), "--target", str(tiny_target_dir), "--limit", "1", "-b", "gsm8k",
                    "--max-new-tokens", "8", "--out", str(tmp_path / "e.json"), env=env),
            run_cli("generate", str(draft_dir), "--target", str(tiny_target_dir), "-p", "hi", "--max-new-tokens",
                    "8", env=env)]
    for r in runs:
        assert r.returncode == 0, r.stderr
        assert "Warning" not in r.stderr, r.stderr


def test_a_config_that_does_not_match_its_weights_is_named_as_such(draft_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "exp"
    export_draft(draft_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["vocab_size"] += 7  # edited by hand, or copied from another draft
    (out / "config.json").write_text(json.dumps(cfg))
    line = _one_error_line(run_cli("export", "--draft", str(out), "--out", str(tmp_path / "again")))
    assert "config.json does not match the draft's weights" in line and "fix vocab_size" in line, line
    assert "trained for this target" not in line


def test_an_unknown_nested_key_lists_the_keys_valid_at_its_level(tmp_path: Path) -> None:
    line = _one_error_line(run_cli("train", "--out", str(tmp_path / "r"), "--set", "optim.lrr=1"))
    assert "unknown key 'optim.lrr' (valid keys there: betas, eps, grad_clip, lr," in line, line
    assert "checkpoint_every" not in line  # the top level's keys are not the fix
