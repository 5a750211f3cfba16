"""Benchmark prompt sets load offline with their published counts."""

from __future__ import annotations

import pytest

from lkspec.data.benchmarks import BENCHMARKS, load_benchmark
from lkspec.errors import LkspecError


@pytest.mark.parametrize(("name", "count"), [("mtbench", 80), ("humaneval", 164), ("gsm8k", 100)])
def test_counts_and_uniform_records(name: str, count: int) -> None:
    recs = load_benchmark(name)
    assert len(recs) == count
    assert len({r.id for r in recs}) == count
    for r in recs:
        assert r.benchmark == name and r.messages[0]["role"] == "user" and r.messages[0]["content"].strip()


def test_details() -> None:
    assert BENCHMARKS == ("mtbench", "humaneval", "gsm8k")
    mt = load_benchmark("mt-bench", turns="all")
    assert all(len(r.followups) == 1 for r in mt) and mt[0].id == "mtbench/81"
    assert load_benchmark("mtbench")[0].followups == []
    he = load_benchmark("humaneval", limit=3)
    assert [r.id for r in he] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert "def has_close_elements" in he[0].messages[0]["content"]
    gsm = load_benchmark("gsm8k")
    assert any("shark" in r.messages[0]["content"] for r in gsm)


def test_bad_names() -> None:
    with pytest.raises(LkspecError, match="unknown benchmark 'mmlu'"):
        load_benchmark("mmlu")
    with pytest.raises(LkspecError, match="limit"):
        load_benchmark("gsm8k", limit=0)
