"""Training in real processes: SIGKILL + --resume is bit-identical; torchrun with 2 ranks equals 1 process."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lkspec.targets import Target
from test_train import make_docs, write_features

RUNNER = "import sys, torch\ntorch.set_num_threads(1)\nfrom lkspec.cli import main\nmain(sys.argv[1:])\n"


@pytest.fixture(scope="module")
def setup(tiny_target: Target, tiny_target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("train-procs")
    torch.set_num_threads(1)
    features = write_features(root / "features", tiny_target.identity, make_docs(tiny_target, 26))
    runner = root / "runner.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    return {"root": root, "features": features, "target": tiny_target_dir, "runner": runner, "env": env}


def cli_args(s: dict[str, Any], out: Path, *extra: str) -> list[str]:
    return ["train", "--features", str(s["features"]), "--target", str(s["target"]), "--out", str(out),
            "--epochs", "3", "--batch-size", "4", "--inner-dim", "16", "--lr", "3e-3", "--warmup-steps", "2",
            "--checkpoint-every", "3", "--log-every", "1", "--heldout-fraction", "0.1", "--no-progress", *extra]


def run_ok(cmd: list[str], env: dict[str, str], timeout: float = 300) -> None:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]


def records(run: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without wall-clock fields (the only thing allowed to differ between runs)."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        r.pop("perf", None)
        out.append(r)
    return out


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(setup: dict[str, Any]) -> None:
    s, py = setup, sys.executable
    ref, run = s["root"] / "uninterrupted", s["root"] / "killed"
    run_ok([py, str(s["runner"]), *cli_args(s, ref)], s["env"])
    total = len([r for r in records(ref) if r["kind"] == "step"])
    kill_after = random.Random().randint(2, total - 6)  # printed by pytest on failure
    print(f"killing after step record {kill_after} of {total}")
    proc = subprocess.Popen([py, str(s["runner"]), *cli_args(s, run)], env=s["env"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and sum(1 for line in metrics.read_text().splitlines() if '"step"' in line[:20]) \
                >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {proc.stderr.read()}"
    assert len(records(run)) < len(records(ref))
    run_ok([py, str(s["runner"]), *cli_args(s, run), "--resume"], s["env"])
    assert records(run) == records(ref)
    for rel in ("model.safetensors", "last/model.safetensors", "trainer_state/model.safetensors",
                "trainer_state/optimizer.safetensors"):
        assert (run / rel).read_bytes() == (ref / rel).read_bytes(), rel
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("parallel,micro", [("ddp", 4096), ("fsdp", 40)])
def test_torchrun_two_processes_equal_one(setup: dict[str, Any], parallel: str, micro: int) -> None:
    """Same global batch: 1 process vs 2 gloo ranks (token-balanced slices, lambda from the global alpha)."""
    s, py = setup, sys.executable
    extra = ["--epochs", "1", "--batch-size", "8", "--checkpoint-every", "0"]
    one = s["root"] / "one-process"
    two = s["root"] / f"two-{parallel}"
    if not (one / "trainer_state").exists():
        run_ok([py, str(s["runner"]), *cli_args(s, one), *extra], s["env"])
    run_ok([py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(s["runner"]),
            *cli_args(s, two), *extra, "--parallel", parallel, "--micro-batch-tokens", str(micro)], s["env"])
    a = load_file(one / "trainer_state" / "model.safetensors")
    b = load_file(two / "trainer_state" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-6, msg=k)
    oa, ob = load_file(one / "trainer_state" / "optimizer.safetensors"), \
        load_file(two / "trainer_state" / "optimizer.safetensors")
    for k in oa:
        torch.testing.assert_close(ob[k], oa[k], rtol=1e-3, atol=1e-9, msg=k)
    ra, rb = records(one), records(two)
    assert [r["kind"] for r in ra] == [r["kind"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for split in ("train", "heldout"):
            if x.get(split):
                assert x[split]["count"] == y[split]["count"]
                assert y[split]["alpha"] == pytest.approx(x[split]["alpha"], rel=1e-5)
                assert y[split]["tau"] == pytest.approx(x[split]["tau"], rel=1e-5)
