"""End to end on the embedded target (SmolLM2-135M-Instruct): the data stage regenerates a few short
ShareGPT responses and caches their hidden states, then `lkspec train` fits a tiny MLP-Speculator with
`kl` and with `lk_hybrid`. Slow (~1 min on 2 CPU cores): one session-scoped feature store serves both runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lkspec.data.features import FeatureStore
from lkspec.data.pipeline import run_all
from lkspec.data.prompts import PromptConfig
from lkspec.data.regenerate import RegenConfig
from lkspec.drafts import load_draft
from lkspec.targets import Target

NUM_PROMPTS = 16
MAX_NEW = 24


@pytest.fixture(scope="session")
def embedded_features(embedded_target: Target, tmp_path_factory: pytest.TempPathFactory) -> FeatureStore:
    """16 short ShareGPT prompts answered by the target itself (sampled, T=1), through the real pipeline."""
    out = tmp_path_factory.mktemp("embedded-data")
    prompts = PromptConfig(source="sharegpt", max_chars=200, limit=NUM_PROMPTS, seed=0)
    regen = RegenConfig(max_new_tokens=MAX_NEW, batch_size=16, seed=0)
    paths = run_all(lambda stage: embedded_target, prompts, regen, out, progress=False, shard_tokens=2048)
    return FeatureStore(paths["features"])


@pytest.mark.slow
def test_kl_and_lk_hybrid_train_from_the_cli_on_the_embedded_target(
    embedded_target: Target, embedded_features: FeatureStore, tmp_path: Path
) -> None:
    from lkspec.cli import main

    store = embedded_features
    assert store.num_docs == NUM_PROMPTS and store.num_loss_tokens > NUM_PROMPTS * 8
    store.check_target(embedded_target.identity)
    for loss in ("kl", "lk_hybrid"):
        run = tmp_path / f"mlp-{loss}"
        # the target comes from the store's identity (no --target); tiny tied draft, a few epochs
        main(["train", "--features", str(store.path), "--out", str(run), "--loss", loss, "--inner-dim", "64",
              "--tie-weights", "--epochs", "3", "--batch-size", "4", "--warmup-steps", "2", "--lr", "1e-2",
              "--heldout-fraction", "0.15", "--checkpoint-every", "0", "--no-progress"])
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        epochs = [r for r in records if r["kind"] == "epoch"]
        assert len(epochs) == 3
        first, last = epochs[0], epochs[-1]
        for k in range(6):  # every head's acceptance rises on the training stream
            assert last["train"]["alpha"][k] > first["train"]["alpha"][k], (loss, k, first, last)
        assert last["heldout"]["tau"] > first["heldout"]["tau"]
        if loss == "lk_hybrid":
            lam = last["train"]["lambda"]
            assert all(0 < x < 1 for x in lam) and lam[0] < first["train"]["lambda"][0]  # moves toward TV
        draft = load_draft(run, target=embedded_target.identity)
        assert draft.config.inner_dim == 64 and draft.config.tie_weights
        info = json.loads((run / "config.json").read_text())["lkspec"]
        assert info["data"]["num_docs"] == store.num_docs and info["train"]["loss"]["name"] == loss
