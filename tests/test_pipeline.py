"""The pipeline config (strict, per-run training configs), the demo presets, the recipe dry run."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from lkspec.cli import main
from lkspec.demo import demo_config
from lkspec.errors import LkspecError
from lkspec.pipeline import RECORD, _check_record, load_pipeline_config
from lkspec.recipe import miniature, plan

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("llama31-8b-*-lk.yaml"))  # the paper's (not -recommended, tested below)


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_unknown_keys_are_one_line_errors() -> None:
    with pytest.raises(LkspecError, match="epoch") as e:
        load_pipeline_config(None, {"epoch": 3})
    assert "\n" not in str(e.value)
    with pytest.raises(LkspecError, match="lr_max"):
        load_pipeline_config(None, {"train.optim.lr_max": 1e-3})  # deep inside the free-form train section
    with pytest.raises(LkspecError, match="unknown loss"):
        load_pipeline_config(None, {"losses": ["kl", "lk"]})
    with pytest.raises(LkspecError, match=r"train\.target"):
        load_pipeline_config(None, {"train.target": "x"})


def test_runs_pair_losses_per_arch_with_the_paper_eta() -> None:
    cfg = load_pipeline_config(None, {"archs": ["mlp_speculator", "medusa"], "arch_options.medusa.num_layers": 2})
    assert [r.name for r in cfg.runs()] == ["mlp-kl", "mlp-lk_hybrid", "medusa-kl", "medusa-lk_hybrid"]
    mlp = cfg.train_config(cfg.run("mlp-lk_hybrid"), Path("o"))
    med = cfg.train_config(cfg.run("medusa-lk_hybrid"), Path("o"))
    assert (mlp.eta, med.eta) == (3.0, 10.0)
    assert med.draft.num_layers == 2 and mlp.draft.num_layers is None
    assert mlp.features == str(Path("o") / "data" / "features")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_are_the_papers(path: Path) -> None:
    cfg = load_pipeline_config(path)
    assert cfg.target == "meta-llama/Llama-3.1-8B-Instruct"
    assert cfg.data.prompts.limit == 660_000
    for spec in cfg.runs():
        t, arch = cfg.train_config(spec, Path(".")), spec.arch
        assert (t.epochs, t.data.batch_size, t.optim.lr, t.draft.num_heads) == (10, 64, 4e-4, 6)
        assert (t.optim.betas, t.optim.warmup_steps, t.optim.grad_clip, t.loss.gamma) == ((0.9, 0.95), 100, 0.5, 0.8)
        assert t.eta == {"mlp_speculator": 3.0, "medusa": 10.0, "eagle3": 3.0}[arch]
        if arch == "eagle3":  # trained with 6 steps over a 32000-token vocabulary, evaluated at K = 7
            assert (t.draft.vocab_size, cfg.eval.k) == (32000, 7)
    lines = "\n".join(plan(cfg))
    assert "lk_hybrid" in lines and "660000" in lines
    small = miniature(cfg, "smollm2-135m-instruct")
    assert small.data.prompts.source == "sharegpt" and small.data.prompts.limit == 8
    assert small.train["max_steps"] == 2 and small.eval.limit == 2
    assert small.data.regenerate.backend == "hf" and "gsm8k_full" not in small.eval.benchmarks


def test_demo_presets_scale_and_reject_bad_knobs() -> None:
    full, quick = demo_config(), demo_config(quick=True)
    assert full.losses == ["kl", "lk_hybrid"] and full.eval.k == 6
    assert full.eval.temperatures == [0.0, 1.0] and set(full.eval.rules) == {"sampled", "greedy"}
    assert quick.data.prompts.limit < full.data.prompts.limit
    assert demo_config(scale=2).data.prompts.limit == 2 * full.data.prompts.limit
    assert demo_config(scale=2).eval.limit == 2 * full.eval.limit
    for cfg in (full, quick, demo_config(scale=3)):  # trained on the benchmarks past the prompts it evaluates
        parts = [p for _, p, _ in cfg.data.parts()]
        assert all(p.skip >= cfg.eval.limit for p in parts if p.source.startswith("bench:"))
        assert [p.source for p in parts if not p.source.startswith("bench:")] == ["sharegpt"]  # MT-bench's kind
    assert demo_config(arch="all").archs == ["mlp_speculator", "medusa"]
    e3, e3_quick = demo_config(arch="eagle3"), demo_config(arch="eagle3", quick=True)
    assert e3.losses == ["lk_hybrid"] and e3.arch_train["eagle3"]["epochs"] == 6  # one long training fits 25 min
    assert e3_quick.arch_train["eagle3"]["epochs"] == 1 and e3_quick.arch_train["eagle3"]["optim"]["lr"] == 1e-3
    assert demo_config(arch="eagle3", overrides={"losses": ["kl", "lk_hybrid"]}).losses == ["kl", "lk_hybrid"]

    with pytest.raises(LkspecError, match="--arch"):
        demo_config(arch="eagle")
    with pytest.raises(LkspecError, match="--scale"):
        demo_config(scale=0)


def test_an_output_folder_refuses_other_settings(tmp_path: Path) -> None:
    _check_record(tmp_path, demo_config(quick=True))
    _check_record(tmp_path, demo_config(quick=True))  # same settings: fine
    assert json.loads((tmp_path / RECORD).read_text())["format"] == "lkspec-pipeline/1"
    with pytest.raises(LkspecError, match=r"data\.prompts\.limit.*--fresh"):
        _check_record(tmp_path, demo_config(quick=True, scale=2))


def test_a_study_grows_in_its_own_folder(tmp_path: Path) -> None:
    """docs/results.md runs the study one architecture at a time in one folder (`--set archs=[...]`, then
    without it); that was refused as "different settings". Choosing runs may change, their inputs may not."""
    cfg = demo_config(quick=True)
    _check_record(tmp_path, cfg.model_copy(update={"archs": ["mlp_speculator"], "seeds": [0]}))
    grown = cfg.model_copy(update={"archs": ["mlp_speculator", "medusa"], "seeds": [0, 1], "losses": ["kl"]})
    _check_record(tmp_path, grown)
    assert json.loads((tmp_path / RECORD).read_text())["config"] == grown.model_dump(mode="json")
    with pytest.raises(LkspecError, match=r"train\.epochs.*--fresh"):
        _check_record(tmp_path, grown.model_copy(update={"train": {**grown.train, "epochs": 9}}))


def test_fresh_refuses_a_folder_lkspec_did_not_make(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mine.txt").write_text("precious")
    code, out = cli(["demo", "--quick", "--out", str(tmp_path), "--fresh"], capsys)
    assert code == 2 and "not an lkspec output folder" in out
    assert (tmp_path / "mine.txt").read_text() == "precious"


@pytest.mark.parametrize(("recipe", "extra"), [("llama31-8b-mlp-lk.yaml", []),
                                               ("llama31-8b-medusa-lk.yaml", ["--set", "data.features.online=true"]),
                                               ("llama31-8b-eagle3-lk.yaml", ["--set", "data.features.online=false"])],
                         ids=["mlp-cached-features", "medusa-online-features", "eagle3-cached-aux-features"])
def test_dry_run_runs_every_stage_in_miniature(recipe: str, extra: list[str], tiny_target_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out = cli(["run", str(ROOT / "configs" / recipe), "--dry-run", "--stand-in", str(tiny_target_dir), "--quiet",
                     "--out", str(tmp_path / "real"), *extra], capsys)
    assert code == 0, out
    assert f"recipe '{recipe.removesuffix('.yaml')}'" in out and "dry run OK: 1 training runs" in out
    assert ("features online" in out) == (extra[-1:] == ["data.features.online=true"])
    assert not (tmp_path / "real").exists()  # the dry run writes nothing where the real run will


def test_recommended_recipe_dry_runs(tiny_target_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The recommended Llama config (target init, token map, two data parts, kl vs lk) runs in miniature."""
    code, out = cli(["run", str(ROOT / "configs" / "llama31-8b-mlp-recommended.yaml"), "--dry-run", "--stand-in",
                     str(tiny_target_dir), "--quiet", "--out", str(tmp_path / "real")], capsys)
    assert code == 0, out
    assert "dry run OK: 2 training runs" in out and not (tmp_path / "real").exists()


def test_study_recipe_dry_runs_with_seeds_and_variants(tiny_target_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """configs/embedded-study.yaml, shrunk to one arch, two losses and two seeds: one run per (loss, seed) and
    per variant, the pooled seed table in the report (a broken table fails the run)."""
    code, out = cli(["run", str(ROOT / "configs" / "embedded-study.yaml"), "--dry-run", "--stand-in",
                     str(tiny_target_dir), "--quiet", "--out", str(tmp_path / "real"),
                     "--set", "archs=[mlp_speculator]", "--set", "losses=[kl,lk_tau]", "--set", "seeds=[0,1]",
                     "--set", "variants.t07.losses=[kl]", "--set", "eval.temperatures=[0,0.7]"], capsys)
    assert code == 0, out
    assert "dry run OK: 6 training runs" in out
    for name in ("mlp-kl-s0", "mlp-lk_tau-s1", "mlp-kl-t07-s1"):
        assert f"train {name}:" in out
    cfg = load_pipeline_config(ROOT / "configs" / "embedded-study.yaml")
    assert len(cfg.runs()) == 2 * (4 + 2) * 3 and not cfg.export.enabled
    t07 = cfg.train_config(cfg.run("medusa-lk_hybrid-t07-s2"), Path("o"))
    assert (t07.loss.temperature, t07.seed, t07.loss.name, t07.eta) == (0.7, 2, "lk_hybrid", 10.0)


def test_bad_seeds_and_variants_are_one_line_errors() -> None:
    with pytest.raises(LkspecError, match="not in losses"):
        load_pipeline_config(None, {"variants": {"t07": {"losses": ["tv"]}}})
    with pytest.raises(LkspecError, match="repeat"):
        load_pipeline_config(None, {"seeds": [1, 1]})
    with pytest.raises(LkspecError, match="letters, digits"):
        load_pipeline_config(None, {"variants": {"t-7": {}}})


def test_a_rerun_reuses_the_fitted_starts_and_the_evaluation(tiny_target_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run of one seed starts from one kept fit (starts/); a rerun with the same drafts and settings rebuilds
    the identical report from eval/<arch>.state.json without replaying, and a retrained draft is replayed."""
    import lkspec.pipeline as pipeline

    cfg = miniature(load_pipeline_config(ROOT / "configs" / "embedded-study.yaml", {
        "archs": ["mlp_speculator"], "losses": ["kl", "lk_hybrid"], "seeds": [0, 1], "variants": {},
        "eval": {"temperatures": [0.0, 1.0]}, "export": {"enabled": True}}), str(tiny_target_dir))
    out = tmp_path / "study"
    first = pipeline.run_pipeline(cfg, out, progress=False, announce=lambda _: None)
    assert len(list((out / "starts").iterdir())) == 2  # seeds 0 and 1; kl and lk_hybrid share each
    notes = [json.loads((out / "runs" / f"mlp-{loss}-s0" / "config.json").read_text())["lkspec"]["draft_start"]
             for loss in ("kl", "lk_hybrid")]
    assert "start_cache" not in notes[0] and notes[1]["start_cache"].startswith(str(out / "starts"))

    def refuse(what: str) -> Callable[..., None]:
        def fail(*_: object, **__: object) -> None:
            raise AssertionError(what)
        return fail

    monkeypatch.setattr(pipeline, "evaluate", refuse("replayed drafts whose evaluation was kept"))
    monkeypatch.setattr(pipeline, "export_draft", refuse("exported again what is exported"))
    again = pipeline.run_pipeline(cfg, out, progress=False, announce=lambda _: None)
    same = [json.dumps(x.reports["mlp"].to_json()) + json.dumps(x.seed_tables["mlp"].to_json()) for x in (first, again)]
    assert same[0] == same[1]  # as text: a NaN (no prompt reached a head) equals itself there
    assert again.exports == first.exports and len(first.exports) == 4

    monkeypatch.undo()
    # killed before its first checkpoint: the step-0 draft and the config are there, no trainer_state/ (the rerun
    # said the folder "already holds a training run")
    shutil.rmtree(out / "runs" / "mlp-lk_hybrid-s1" / "trainer_state")
    shutil.rmtree(out / "runs" / "mlp-lk_hybrid-s1" / "last")
    pipeline.run_pipeline(cfg, out, progress=False, announce=lambda _: None)
    assert (out / "runs" / "mlp-lk_hybrid-s1" / "trainer_state").is_dir()

    monkeypatch.setattr(pipeline, "evaluate", refuse("replayed drafts whose evaluation was kept"))
    weights = out / "runs" / "mlp-kl-s1" / "model.safetensors"
    changed = bytearray(weights.read_bytes())
    changed[-1] ^= 1  # the last byte of the last tensor: still a valid draft, with other weights
    weights.write_bytes(bytes(changed))
    with pytest.raises(AssertionError, match="replayed drafts"):
        pipeline.run_pipeline(cfg, out, progress=False, announce=lambda _: None)


def test_training_on_an_evaluated_benchmark_must_skip_its_evaluated_prompts() -> None:
    part = {"prompts": {"source": "bench:gsm8k", "skip": 5}}
    with pytest.raises(LkspecError, match=r"data\.extra\[0\]\.prompts\.skip >= 10"):
        load_pipeline_config(None, {"data": {"extra": [part]}, "eval": {"limit": 10}})
    with pytest.raises(LkspecError, match=r"data\.prompts trains on mtbench, gsm8k from prompt 40.*all of their"):
        load_pipeline_config(None, {"data": {"prompts": {"source": "bench:mt-bench,gsm8k", "skip": 40}}})
    cfg = load_pipeline_config(None, {"data": {"extra": [{"prompts": {"source": "bench:gsm8k", "skip": 10}}]},
                                      "eval": {"limit": 10}})
    assert cfg.data.extra[0].prompts.skip == 10
    # a benchmark the evaluation does not read may be trained on from its first prompt
    load_pipeline_config(None, {"data": {"prompts": {"source": "bench:humaneval"}},
                                "eval": {"benchmarks": ["gsm8k"], "limit": 10}})
