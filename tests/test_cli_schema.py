"""The command line is generated from the config schema: every flag and default shown is the model's own."""

from __future__ import annotations

import re

import pytest
from pydantic import Field

from helpers import run_cli
from lkspec.cli.schema import command, merged, overrides_from, prefixed, schema_options
from lkspec.config import StrictModel, flag
from lkspec.data.features import FeatureOptions
from lkspec.data.prompts import PromptConfig
from lkspec.data.regenerate import RegenConfig
from lkspec.errors import LkspecError
from lkspec.evaluate.run import EvalSettings
from lkspec.train.config import TrainConfig

# `lkspec train --help` before the CLI was generated from the schema (every one of these must stay)
TRAIN_FLAGS_BEFORE = {
    "--out", "-o", "--features", "-f", "--target", "-t", "--arch", "--num-heads", "-k", "--inner-dim",
    "--tie-weights", "--no-tie-weights", "--scale-input", "--no-scale-input", "--num-layers", "--loss", "--eta",
    "--gamma", "--temperature", "--loss-impl", "--lr", "--warmup-steps", "--grad-clip", "--batch-size", "-b",
    "--batch-tokens", "--micro-batch-tokens", "--heldout-fraction", "--epochs", "-e", "--max-steps", "--seed",
    "--checkpoint-every", "--log-every", "--precision", "--parallel", "--compile", "--no-compile", "--progress",
    "--no-progress", "--set", "--resume", "--init-from",
}
DATA_ALL_FLAGS_BEFORE = {
    "--out", "--target", "--device", "--backend", "--max-new-tokens", "--temperature", "--top-k", "--top-p",
    "--gen-batch-size", "--max-prompt-tokens", "--prompts", "--hf-config", "--split", "--prompt-field",
    "--messages-field", "--response-field", "--id-field", "--ignore-responses", "--strict", "--no-dedupe",
    "--min-chars", "--max-chars", "--no-shuffle", "--seed", "--limit", "--dtype", "--batch-size", "--shard-tokens",
    "--max-tokens", "--quiet",
}
EVAL_FLAGS_BEFORE = {
    "--target", "--label", "--k", "-k", "--temperature", "-t", "--rule", "--benchmark", "-b", "--limit",
    "--max-new-tokens", "--seed", "--top-k", "--top-p", "--batch-size", "--bootstrap", "--out", "-o", "--table",
    "--plot", "--no-cache", "--device",
}


def _help(*args: str) -> str:
    out = run_cli(*args, "--help", timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", text))


@pytest.mark.parametrize(("cmd", "options", "before"), [
    (["train"], schema_options(TrainConfig), TRAIN_FLAGS_BEFORE),
    (["eval"], schema_options(EvalSettings), EVAL_FLAGS_BEFORE),
    (["data", "all"], merged(schema_options(RegenConfig), schema_options(PromptConfig), schema_options(FeatureOptions)),
     DATA_ALL_FLAGS_BEFORE),
])
def test_help_shows_the_schema_flags_and_defaults(cmd: list[str], options: list, before: set[str]) -> None:
    text = _help(*cmd)
    shown = _flags(text)
    assert before <= shown, sorted(before - shown)
    lines = text.splitlines()
    for opt in options:
        for decl in (d for part in opt.decls for d in part.split("/")):
            assert decl in shown, decl
        first = re.escape(opt.decls[0].split("/")[0])
        row = next(line for line in lines if re.search(rf"(?<![\w-]){first}(?![\w-])", line))
        if opt.default is not None:
            assert f"[default: ({opt.default})]" in row, (opt.keys, row)
        else:
            assert "[default:" not in row, (opt.keys, row)


def test_generated_command_passes_only_typed_flags_as_overrides() -> None:
    class Inner(StrictModel):
        rate: float = Field(0.5, description="a rate", **flag("--rate", "-r"))
        hidden: int = 3  # no flag

    class Outer(StrictModel):
        inner: Inner = Field(default_factory=Inner)
        seeds: list[int] = Field(default_factory=lambda: [0], description="seeds", **flag("--seed"))
        verbose: bool = Field(False, description="talk", **flag())

    opts = schema_options(Outer)
    assert [(o.keys, o.decls, o.default) for o in opts] == [
        (["inner.rate"], ["--rate", "-r"], "0.5"), (["seeds"], ["--seed"], "0"),
        (["verbose"], ["--verbose/--no-verbose"], "false")]
    seen = {}

    def fn(x: int = 1, overrides: dict | None = None) -> None:
        seen.update(x=x, overrides=overrides)

    cmd = command(fn, opts)
    cmd(x=2, opt_rate=None, opt_seed=["1,2", "3"], opt_verbose=None)
    assert seen == {"x": 2, "overrides": {"seeds": [1, 2, 3]}}
    with pytest.raises(LkspecError, match="--seed takes int values"):
        overrides_from(opts, {"opt_seed": ["1,x"]})
    both = merged(prefixed(opts, "a."), prefixed(opts, "b."))
    assert [o.keys for o in both if o.decls[0] == "--seed"] == [["a.seeds", "b.seeds"]]
