"""Helpers shared by several test files (pytest puts tests/ on sys.path: `from helpers import ...`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch

import lkspec
from lkspec.drafts import Draft

LKSPEC = Path(sys.executable).with_name("lkspec")  # the installed console script: the real entry point


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """`lkspec ARGS` in a subprocess, as a user runs it (wide, uncoloured help output)."""
    full = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb", **(env or {})}
    return subprocess.run([str(LKSPEC), *args], capture_output=True, text=True, env=full, timeout=timeout, cwd=cwd)


def kill_at_marker(script: str, marker: str) -> None:
    """Run `script` in a fresh interpreter and SIGKILL it once it prints `marker`: a crash no handler sees."""
    env = {**os.environ, "PYTHONPATH": str(Path(lkspec.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, env=env,
                            text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if marker in line:
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the script ended on its own before printing {marker!r}"


class StubDraft(Draft):
    """A test draft that defines only what a test needs (forward / propose); the rest is not implemented."""

    def head_states(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def head_weight(self, k: int) -> torch.Tensor:
        raise NotImplementedError

    def _propose_logits(self, *args: Any) -> Any:
        raise NotImplementedError

    def vllm_config(self) -> dict[str, Any]:
        raise NotImplementedError
