"""Atomic writes: all-or-nothing, and the files get the usual permissions (servers often run as another user)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from lkspec.errors import LkspecError
from lkspec.io import atomic_dir, atomic_path, disk_full_is_one_line, read_json, write_error, write_json


def test_atomic_file_permissions_and_failure(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("hi")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert read_json(tmp_path / "a.json") == {"x": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_atomic_dir_refuses_existing_unless_overwrite(tmp_path) -> None:
    with atomic_dir(tmp_path / "d") as d:
        (d / "v").write_text("1")
    with pytest.raises(FileExistsError), atomic_dir(tmp_path / "d") as d:
        (d / "v").write_text("2")
    assert (tmp_path / "d" / "v").read_text() == "1"
    with atomic_dir(tmp_path / "d", overwrite=True) as d:
        (d / "v").write_text("3")
    assert (tmp_path / "d" / "v").read_text() == "3"


def test_full_disk_is_one_line_and_other_errors_pass() -> None:
    with pytest.raises(LkspecError) as err, disk_full_is_one_line("writing part 3 to out", "parts 0-2 are kept"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(err.value) == ("disk full while writing part 3 to out: parts 0-2 are kept; free space and rerun the "
                              "same command to resume")
    assert err.value.__cause__ is None and err.value.__suppress_context__
    with pytest.raises(LkspecError, match="disk full while"), disk_full_is_one_line("x", "y"):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(PermissionError), disk_full_is_one_line("x", "y"):
        raise PermissionError(errno.EACCES, "Permission denied")
    other = write_error(OSError(errno.EIO, "I/O error"), "saving the draft", then="rerun with --resume")
    assert str(other) == ("writing failed ([Errno 5] I/O error) while saving the draft; free space and rerun "
                          "with --resume")


def test_tied_tensors_are_written_once_and_restored(tmp_path: Path) -> None:
    """A tied draft stores each shared tensor once (aliases in the metadata) and loads back tied."""
    from safetensors import safe_open

    from lkspec.drafts import build_draft, load_draft
    from lkspec.io import load_tensors, save_tensors

    w = torch.randn(50, 8)
    save_tensors(tmp_path / "t.safetensors", {"a": w, "b": w, "c": w.clone()}, dedupe=True)
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["a", "c"]
    back = load_tensors(tmp_path / "t.safetensors")
    assert torch.equal(back["b"], w) and back["b"] is back["a"]
    tied = build_draft("mlp_speculator", hidden_size=16, vocab_size=400, inner_dim=32, tie_weights=True, seed=0)
    untied = build_draft("mlp_speculator", hidden_size=16, vocab_size=400, inner_dim=32, seed=0)
    size = {n: (d.save(tmp_path / n) / "model.safetensors").stat().st_size for n, d in [("t", tied), ("u", untied)]}
    assert size["t"] < size["u"] / 4
    again = load_draft(tmp_path / "t")
    assert again.head[5].weight is again.head[0].weight
    for x, y in zip(tied(torch.randn(1, 9, 16), torch.zeros(1, 9, dtype=torch.long)),
                    again(torch.randn(1, 9, 16), torch.zeros(1, 9, dtype=torch.long)), strict=True):
        assert x.shape == y.shape


def test_saved_tensors_get_the_umasks_mode(tmp_path: Path) -> None:
    """safetensors recreates the file it writes with mode 600; a server running as another user must be able to
    read an export, so the file ends with the mode the umask gives (644 under 022)."""
    from lkspec.io import save_tensors

    old = os.umask(0o022)
    try:
        save_tensors(tmp_path / "w.safetensors", {"x": torch.zeros(3)})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644
