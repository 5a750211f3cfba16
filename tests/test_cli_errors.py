"""Every bad command line is one `error:` line on stderr and exit status 2, never a traceback (the real entry
point, in a subprocess, as a user runs it)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import run_cli

# subcommand -> (required option left out, or None; an option given a bad value)
CASES = {
    ("data", "prompts"): (None, ["--limit", "x"]),
    ("data", "regenerate"): (["--limit", "1"], ["--out", "o", "--max-new-tokens", "x"]),
    ("data", "features"): (["--out", "o"], ["--tokens", "t", "--out", "o", "--batch-size", "x"]),
    ("data", "all"): (None, ["--limit", "x"]),
    ("train",): (["--epochs", "1"], ["--out", "o", "--epochs", "x"]),
    ("eval",): (["--limit", "1"], ["d", "--limit", "x"]),
    ("generate",): (None, ["--limit", "x"]),
    ("export",): (["--out", "o"], ["--draft", "d", "--out", "o", "-k", "x"]),
    ("demo",): (None, ["--scale", "x"]),
    ("run",): (["--fresh"], ["c.yaml", "--stand-in"]),
}


def _runs() -> list[tuple[str, list[str]]]:
    out = [("misspelt command", ["trian"])]
    for cmd, (missing, bad) in CASES.items():
        name = " ".join(cmd)
        if missing is not None:
            out.append((f"{name}: missing required", [*cmd, *missing]))
        out.append((f"{name}: unknown option", [*cmd, "--no-such-flag"]))
        out.append((f"{name}: bad value", [*cmd, *bad]))
    return out


@pytest.fixture(scope="module")
def results() -> dict[str, tuple[int, str]]:
    runs = _runs()
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda r: run_cli(*r[1], timeout=120), runs))
    return {label: (p.returncode, p.stderr) for (label, _), p in zip(runs, done, strict=True)}


@pytest.mark.parametrize("label", [label for label, _ in _runs()])
def test_usage_error_is_one_line_and_exit_2(results: dict[str, tuple[int, str]], label: str) -> None:
    code, err = results[label]
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (label, code, err[-500:])
    assert len(lines) == 1 and lines[0].startswith("error:"), (label, err[-500:])
    assert "Traceback" not in err


def test_ctrl_c_exits_130_with_one_line(tiny_target_dir, tmp_path) -> None:
    """SIGINT in a long stage: exit 130 (so `&&` chains stop) and one line saying what is kept."""
    import os
    import signal
    import subprocess
    import time

    from helpers import LKSPEC

    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    proc = subprocess.Popen([str(LKSPEC), "data", "regenerate", "--target", str(tiny_target_dir), "--limit", "400",
                             "--gen-batch-size", "1", "--max-new-tokens", "64", "--out", str(tmp_path / "tok")],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, text=True, bufsize=1,
                            # as at a terminal: a suite started in the background (`... &`) hands its children
                            # SIGINT ignored, and Python then never raises KeyboardInterrupt
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stderr is not None
    seen, t0 = "", time.time()
    while "regenerate" not in seen and time.time() - t0 < 120:
        seen += proc.stderr.read(1)
    os.kill(proc.pid, signal.SIGINT)
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    lines = [line for line in rest.replace("\r", "\n").splitlines() if line.strip()]
    assert proc.returncode == 130, (proc.returncode, rest[-500:])
    assert lines[-1].startswith("interrupted:") and "rerun the same command" in lines[-1]
    assert "Traceback" not in rest
