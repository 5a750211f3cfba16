"""The feature-store format: round trip, resume, orphan shards, identity and dtype checks."""

from __future__ import annotations

import pytest
import torch

from lkspec.data.features import Doc, FeatureStore, FeatureWriter
from lkspec.errors import LkspecError
from lkspec.targets import TargetIdentity

IDENT = TargetIdentity(name="t", vocab_size=50, hidden_size=8, tokenizer_hash="ab" * 32)


def _docs(rows: range, seed: int = 0) -> list[Doc]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in rows:
        n = 3 + r % 5
        out.append(Doc(row=r, input_ids=torch.randint(0, 50, (n,), generator=g),
                       loss_mask=torch.arange(n) >= 2, hidden=torch.randn(n, 8, generator=g)))
    return out


def test_roundtrip_and_resume(tmp_path) -> None:
    docs = _docs(range(7))
    w = FeatureWriter(tmp_path / "f", IDENT, dtype="float32")
    w.write_shard(docs[:4])
    w2 = FeatureWriter(tmp_path / "f", IDENT, dtype="float32")  # reopen = resume
    assert w2.done_rows() == {0, 1, 2, 3}
    w2.write_shard(docs[4:])
    store = FeatureStore(tmp_path / "f")
    assert store.num_docs == 7 and store.num_tokens == sum(len(d) for d in docs)
    got = {d.row: d for d in store.iter_docs()}
    for d in docs:
        assert torch.equal(got[d.row].input_ids, d.input_ids)
        assert torch.equal(got[d.row].loss_mask, d.loss_mask)
        assert torch.equal(got[d.row].hidden, d.hidden)
    shuffled = [d.row for d in store.iter_docs(seed=1)]
    assert sorted(shuffled) == list(range(7)) and shuffled == [d.row for d in store.iter_docs(seed=1)]


def test_orphan_shard_is_discarded_and_checks(tmp_path) -> None:
    w = FeatureWriter(tmp_path / "f", IDENT, dtype="bfloat16")
    w.write_shard(_docs(range(2)))
    (tmp_path / "f" / "shard-00001.safetensors").write_bytes(b"partial")  # crash before the index update
    FeatureWriter(tmp_path / "f", IDENT, dtype="bfloat16")
    assert not (tmp_path / "f" / "shard-00001.safetensors").exists()
    assert FeatureStore(tmp_path / "f").load_shard(0)[0].hidden.dtype == torch.bfloat16
    with pytest.raises(LkspecError, match="pass --dtype bfloat16"):
        FeatureWriter(tmp_path / "f", IDENT, dtype="float16")
    other = IDENT.model_copy(update={"name": "u", "hidden_size": 9})
    with pytest.raises(LkspecError, match="made for target 't'"):
        FeatureStore(tmp_path / "f").check_target(other)
    with pytest.raises(LkspecError, match="not a feature directory"):
        FeatureStore(tmp_path)
