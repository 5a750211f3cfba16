"""The README.md model card and provenance.json of an export.

The card follows the seed cards of the LK-losses release (e.g. nebius/MLP-Speculator-Llama-3.1-8B-Instruct):
base model, architecture, training data, objective, epochs, K, the τ table at T = 0 / T = 1 per benchmark,
the exact vLLM usage, which engines can serve it at all (the serving matrix), and the base model's
license. Everything in it comes from the run's recorded metadata and the eval results file, never from
defaults, so a field the run did not record says "not recorded".
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lkspec
from lkspec.data.benchmarks import BENCHMARKS
from lkspec.drafts import Draft, Eagle3, Medusa, MLPSpeculator
from lkspec.drafts.checkpoint import EXPORT_FORMAT
from lkspec.errors import LkspecError
from lkspec.export.card_facts import (
    BIBTEX_ARCH,
    BIBTEX_LK,
    comparison,
    data_words,
    model_index,
    objective_words,
    public,
    start_words,
    vocab_words,
)
from lkspec.targets import TargetIdentity

EVAL_FORMAT = "lkspec-eval/1"

SERVING_MATRIX = """\
| engine | MEDUSA | MLP-Speculator |
|---|---|---|
| vLLM ≤ 0.9.2 | yes | yes — V0 engine only (drafts sampled at the request's temperature); do not set `VLLM_USE_V1=1` |
| vLLM 0.10 – 0.32 | yes — drafts are greedy (argmax) at T > 0 | no ("Unknown speculative decoding method") |
| ArcticInference plugin (vLLM V1) | no | yes — export with `--format arctic`; drafts greedy |
| vLLM ≥ 0.33 | removed | removed |
| lkspec's own generator (`lkspec generate`) | yes — sampled drafts | yes — sampled drafts |

In short: MEDUSA runs on vLLM 0.10–0.32 (drafts greedy at T > 0); MLP-Speculator runs on vLLM ≤ 0.9.2
(V0 engine) or the ArcticInference plugin; vLLM 0.33 dropped both; lkspec's own generator runs both with
sampled drafts. Greedy drafts stay lossless, but their acceptance at T > 0 is p(argmax q) instead of
Σ min(p, q), so the "greedy" τ column is the one to expect from those engines."""

KNOWN_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
KNOWN_ARCHS = {"smollm2-135m-instruct": ["LlamaForCausalLM"],
               "huggingfacetb/smollm2-135m-instruct": ["LlamaForCausalLM"]}


def license_note(base_model: str | None) -> tuple[str, str]:
    """(card metadata id, sentence) for the base model's license: drafts are derived from its outputs."""
    name = (base_model or "").lower().replace("_", "-")
    if "smollm2" in name:
        return "apache-2.0", "Apache-2.0, the license of the base model SmolLM2."
    if re.search(r"llama-?3\.1", name):
        return "llama3.1", ("Llama 3.1 Community License: the draft is trained on the outputs of a Llama 3.1 "
                            "model, so the base model's license and acceptable use policy apply.")
    return "other", "See the base model's license: the draft is trained on its outputs."


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the lkspec source tree; (None, None) if lkspec is not running from a git checkout."""
    pkg = Path(lkspec.__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(pkg), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if not top or (Path(top) / "src" / "lkspec").resolve() != pkg:
        return None, None  # installed into site-packages (maybe inside someone else's repository)
    status = git("status", "--porcelain", "--", ":/src")
    return git("rev-parse", "HEAD"), (bool(status) if status is not None else None)


# ----- eval results --------------------------------------------------------------------------------
def select_eval_rows(path: str | Path, *, draft_dir: Path, label: str | None,
                     target: dict[str, Any] | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of an `lkspec eval --out` file that belong to this draft (by label, else by path)."""
    p = Path(path)
    if not p.is_file():
        raise LkspecError(f"eval results {p} do not exist; pass the file written by `lkspec eval --out`")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise LkspecError(f"eval results {p} are not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or data.get("format") != EVAL_FORMAT or not isinstance(data.get("rows"), list):
        raise LkspecError(f"{p} is not an lkspec eval results file (format {EVAL_FORMAT!r} with rows)")
    if target and data.get("target"):
        TargetIdentity.model_validate(target).check(data["target"], what=f"eval results {p}")
    rows = data["rows"]
    labels = sorted({str(r.get("draft")) for r in rows})
    if label is not None:
        chosen = [r for r in rows if r.get("draft") == label]
        if not chosen:
            raise LkspecError(f"{p} has no rows for draft {label!r}; it has {labels}")
    else:
        here = draft_dir.resolve()
        chosen = [r for r in rows if r.get("draft_path") and Path(r["draft_path"]).resolve() == here]
        if not chosen:
            if len(labels) != 1:
                raise LkspecError(f"{p} evaluates several drafts {labels} and none from {draft_dir}; "
                                  f"pick one with --eval-draft")
            chosen = rows
    needed = ("benchmark", "temperature", "rule", "tau")
    for r in chosen:
        if any(k not in r for k in needed):
            raise LkspecError(f"{p}: a row lacks one of {list(needed)}; regenerate it with `lkspec eval --out`")
    return chosen, data


def _fmt_tau(row: dict[str, Any] | None) -> str:
    if row is None:
        return "—"
    ci = row.get("ci95")
    return f"{row['tau']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{row['tau']:.2f}"


def tau_table(rows: Sequence[dict[str, Any]]) -> str:
    """Benchmarks × (temperature, draft rule) τ table; T = 0 is one column (both rules coincide there)."""
    cols: list[tuple[float, str]] = []
    for r in sorted(rows, key=lambda r: (float(r["temperature"]), r["rule"] != "sampled")):
        key = (float(r["temperature"]), "any" if float(r["temperature"]) == 0 else str(r["rule"]))
        if key not in cols:
            cols.append(key)
    cell: dict[tuple[str, float, str], dict[str, Any]] = {}
    for r in rows:
        t = float(r["temperature"])
        cell.setdefault((str(r["benchmark"]), t, "any" if t == 0 else str(r["rule"])), r)
    names = {str(r["benchmark"]) for r in rows}
    order = [b for b in BENCHMARKS if b in names] + sorted(names - set(BENCHMARKS) - {"mean"})
    if "mean" not in names and len(order) > 1:  # the eval stage normally writes it; derive it otherwise
        for t, rule in cols:
            taus = [cell[(b, t, rule)]["tau"] for b in order if (b, t, rule) in cell]
            if len(taus) == len(order):
                cell[("mean", t, rule)] = {"tau": sum(taus) / len(taus)}
    order.append("mean")
    head = ["benchmark"] + [f"T = {t:g}" if rule == "any" else f"T = {t:g}, {rule} drafts" for t, rule in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in order:
        if any((b, t, rule) in cell for t, rule in cols):
            label = f"**{b}**" if b == "mean" else b
            lines.append("| " + " | ".join([label] + [_fmt_tau(cell.get((b, t, rule))) for t, rule in cols]) + " |")
    return "\n".join(lines)


# ----- the card ------------------------------------------------------------------------------------
def _architecture(draft: Draft) -> str:
    c = draft.config
    if isinstance(draft, MLPSpeculator):
        return (f"MLP-Speculator, {c.num_heads} stages, emb_dim {c.hidden_size} → inner_dim {c.inner}, "
                f"{'tied' if c.tie_weights else 'untied'} weights, scale_input {str(c.scale_input).lower()}")
    if isinstance(draft, Medusa):
        return (f"MEDUSA, {c.num_heads} heads × {c.num_layers} residual layer(s) of width {c.hidden_size}, "
                f"{'with' if c.bias else 'no'} biases, one lm_head per head")
    if isinstance(draft, Eagle3):
        return (f"EAGLE-3, one decoder layer (hidden {c.hidden_size}, {c.num_attention_heads} heads / "
                f"{c.num_key_value_heads} KV heads, MLP {c.intermediate_size}) over target layers {c.aux_layers}, "
                f"{c.head_rows}-token head, trained with {c.num_heads} training-time-test steps")
    return draft.arch


def _target_text(target: dict[str, Any] | None) -> str:
    if not target:
        return "not recorded"
    text = (f"lkspec target `{target.get('name')}` (vocab {target.get('vocab_size')}, hidden "
            f"{target.get('hidden_size')}, tokenizer sha256 {str(target.get('tokenizer_hash'))[:12]}…)")
    if str(target.get("name", "")).lower() in KNOWN_HUB_IDS:
        text += "; lkspec's embedded copy of the base model (a de-quantised Q4_1 GGUF)"
    return text


def _spec(method: str, model_id: str, n: int) -> str:
    return json.dumps({"method": method, "model": model_id, "num_speculative_tokens": n})


def usage(arch: str, fmt: str, base: str, model_id: str, n: int) -> str:
    if arch == "eagle3":
        intro = ("vLLM ≥ 0.10 (EAGLE-3 is what current vLLM serves; drafts are argmax at T > 0; name the method, "
                 "vLLM guesses it from the path otherwise). SGLang serves the native layout with "
                 "`--speculative-algorithm EAGLE3`:")
        install, method, env = 'pip install "vllm>=0.10"', "eagle3", ""
    elif arch == "medusa":
        intro = "vLLM 0.10 – 0.32 (0.32.0 is the last release with MEDUSA; drafts are argmax at T > 0):"
        install, method, env = 'pip install "vllm>=0.10,<0.33"', "medusa", ""
    elif fmt == "arctic":
        intro = ("vLLM V1 with the ArcticInference plugin (drafts are argmax; this layout follows the plugin's "
                 "source and is not exercised by lkspec's tests):")
        install, method, env = 'pip install "arctic-inference[vllm]"', "arctic", "ARCTIC_INFERENCE_ENABLED=1 "
    else:
        intro = "vLLM ≤ 0.9.2, V0 engine (drafts sampled at the request's temperature; do not set VLLM_USE_V1=1):"
        install, method, env = 'pip install "vllm==0.9.2"', "mlp_speculator", ""
    spec = _spec(method, model_id, n)
    py = (f"from vllm import LLM, SamplingParams\n\n"
          f"llm = LLM(\n    model={json.dumps(base)},\n    speculative_config={spec},\n)\n"
          f"print(llm.generate([\"Hello\"], SamplingParams(temperature=0.0, max_tokens=64))[0].outputs[0].text)")
    sh = f"{install}\n{env}vllm serve {base} --speculative-config '{spec}'"
    return f"{intro}\n\n```python\n{py}\n```\n\nor as a server:\n\n```bash\n{sh}\n```"


def model_card(*, draft: Draft, fmt: str, dtype: str, base_model: str, model_id: str,
               meta: dict[str, Any], target: dict[str, Any] | None, eval_rows: list[dict[str, Any]] | None,
               eval_meta: dict[str, Any] | None, source_heads: int, commit: str | None,
               source_config: dict[str, Any] | None = None, eval_label: str | None = None) -> str:
    """README.md in the reference cards' shape; `model-index` metadata from the eval rows (huggingface_hub)."""
    arch_name = draft.title
    n = draft.num_heads
    lic_id, lic_text = license_note(base_model)
    train = meta.get("train") or {}
    start = meta.get("draft_start") or {}
    picked = []
    if meta.get("epoch") is not None:
        picked.append(f"epoch {meta['epoch']}")
    if meta.get("step") is not None:
        picked.append(f"step {meta['step']}")
    heldout = meta.get("heldout") or {}
    if heldout.get("tau") is not None:
        picked.append(f"held-out simulated τ {heldout['tau']:.2f}")
    k_text = f"K = {n}" + (f" (first {n} of the {source_heads} trained heads)" if n != source_heads else "")
    bullets = [
        ("Base model", f"`{base_model}`"),
        ("Architecture", _architecture(draft)),
        ("Training data", data_words(meta.get("data"), base_model.rsplit("/", 1)[-1])),
        ("Objective", objective_words(train)),
        ("Training", start_words(train, start, train.get("epochs"))
         + (f"; selected checkpoint: {', '.join(picked)}" if picked else "")),
        ("Draft length", k_text),
        ("Vocabulary", vocab_words(source_config or draft.config.model_dump(), start, draft.config.head_rows)),
        ("Parameters", f"{draft.num_parameters() / 1e6:.2f} M (distinct; tied weights counted once)"),
        ("Trained against", _target_text(target)),
        ("Export", f"{dtype}, {'ArcticInference' if fmt == 'arctic' else 'vLLM'} layout, lkspec "
                   f"{lkspec.__version__}" + (f" (git {commit[:12]})" if commit else "")),
    ]
    details = "\n".join(f"- **{k}**: {v}" for k, v in bullets)
    em = eval_meta or {}
    if eval_rows:
        note = (f"τ = tokens emitted per target forward pass (the bonus token included), measured exactly by "
                f"lkspec's coupling replay with K = {em.get('k', '?')}, up to {em.get('max_new_tokens', '?')} "
                f"new tokens, seed {em.get('seed', '?')}; [95% bootstrap CI over prompts]. Sampled drafts: "
                f"Leviathan acceptance min(1, p/q) (lkspec's generator, vLLM ≤ 0.9.2 MLP); greedy drafts: "
                f"the draft's argmax (vLLM 0.10–0.32 MEDUSA, ArcticInference). vLLM's greedy drafting "
                f"under-estimates what this draft accepts at T > 0: its acceptance is p(argmax q), not "
                f"Σ min(p, q), so read the greedy column for those engines.")
        if em.get("k") is not None and em.get("k") != n:
            note += f" Evaluated with K = {em['k']}; this export serves {n} heads."
        compared = comparison(em.get("rows", []), em.get("differences", []), eval_label)
        perf = (f"Mean over the benchmarks, every draft of the evaluation (same target samples):\n\n{compared}\n\n"
                if compared else "")
        tau = f"{perf}This draft per benchmark:\n\n{tau_table(eval_rows)}\n\n{note}"
    else:
        tau = "No evaluation results were attached (`lkspec export --eval results.json` adds them here)."
    tags = ["speculative-decoding", draft.arch.replace("_", "-"), "lk-losses", "lkspec"]
    name = model_id if "/" in model_id.strip("./") else f"{arch_name}-{base_model.rsplit('/', 1)[-1]}"
    card_data = model_index(eval_rows or [], base_model=base_model, license_id=lic_id, tags=tags,
                            model_name=name, draft_label=eval_label)
    local = "" if "/" in model_id.strip("./") else (
        f"\n\n`{model_id}` is the folder holding this card: use its path, or the hub id once uploaded "
        f"(`lkspec export --repo-id OWNER/NAME` writes it here).")
    return f"""---
{card_data.to_yaml()}
---

# {arch_name} draft for {base_model}, trained with LK losses

A {n}-head {arch_name} draft model for speculative decoding with `{base_model}`, trained with
lkspec (LK losses, arXiv:2602.23881) to match the base model's next-token distributions. Speculative decoding with
rejection sampling is lossless: the output distribution is the base model's; the draft only changes how
many tokens each target forward pass emits (τ).

## Training details

{details}

## Performance: acceptance length τ

{tau}

## Usage

{usage(draft.arch, fmt, base_model, model_id, n)}{local}

`num_speculative_tokens` may be at most {n} (the heads in this checkpoint).

## Serving matrix

{SERVING_MATRIX}

## License

{lic_text}

## Citation

```bibtex
{BIBTEX_LK}

{BIBTEX_ARCH.get(draft.arch, "")}
```
"""


def provenance(*, draft: Draft, source: Path, layout_name: str, meta: dict[str, Any], target: dict[str, Any] | None,
               export: dict[str, Any], commit: str | None, dirty: bool | None) -> dict[str, Any]:
    return {
        "format": f"{EXPORT_FORMAT}1",
        "lkspec_version": lkspec.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": {"path": source.name, "layout": layout_name},
        "arch": draft.arch,
        "draft_config": draft.config.model_dump(),
        "target": target,
        "training": public({k: meta.get(k) for k in ("train", "step", "epoch", "heldout", "draft_start")}),
        "data": public(meta.get("data")),
        "export": public(export),
    }
