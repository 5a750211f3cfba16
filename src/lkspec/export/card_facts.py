"""What a published model card says about a run, in words, and its hub metadata.

A card is read by people deciding whether to serve a draft and by the Hugging Face hub, which shows
`model-index` results ("Acceptance Length on MT-Bench") beside the model. So the run's recorded metadata
becomes sentences ("445 responses SmolLM2-135M-Instruct wrote to ShareGPT prompts: 222 at T = 1, 223 at
T = 0"), the eval file becomes `model-index` entries built with huggingface_hub itself, and nothing in a
card or its provenance keeps a path of the machine it was made on (`public`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from lkspec.data.source import recorded_parts
from lkspec.losses import LOSSES

# how the hub knows the benchmarks lkspec evaluates on
HUB_DATASETS = {
    "mtbench": ("HuggingFaceH4/mt_bench_prompts", "MT-Bench"),
    "humaneval": ("openai/openai_humaneval", "HumanEval"),
    "gsm8k": ("openai/gsm8k", "GSM8K"),
    "gsm8k_full": ("openai/gsm8k", "GSM8K"),
}
TASK = ("speculative-decoding", "Speculative decoding")
METRIC = "acceptance_length"

BIBTEX_LK = """@inproceedings{samarin2026lk,
  title     = {LK Losses: Direct Acceptance Rate Optimization for Speculative Decoding},
  author    = {Samarin and Krutikov and Shevtsov and Skvortsov and Fisin and Golubev},
  booktitle = {Proceedings of the 43rd International Conference on Machine Learning (PMLR 306)},
  year      = {2026},
  eprint    = {2602.23881},
  archivePrefix = {arXiv}
}"""
BIBTEX_ARCH = {
    "mlp_speculator": """@article{wertheimer2024accelerating,
  title   = {Accelerating Production LLMs with Combined Token/Embedding Speculators},
  author  = {Wertheimer, Davis and Rosenkranz, Joshua and Parnell, Thomas and Suneja, Sahil and Ranganathan,
             Pavithra and Ganti, Raghu and Srivatsa, Mudhakar},
  journal = {arXiv preprint arXiv:2404.19124},
  year    = {2024}
}""",
    "medusa": """@inproceedings{cai2024medusa,
  title     = {Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads},
  author    = {Cai, Tianle and Li, Yuhong and Geng, Zhengyang and Peng, Hongwu and Lee, Jason D. and Chen, Deming
               and Dao, Tri},
  booktitle = {Proceedings of the 41st International Conference on Machine Learning},
  year      = {2024},
  eprint    = {2401.10774},
  archivePrefix = {arXiv}
}""",
    "eagle3": """@article{li2025eagle3,
  title   = {EAGLE-3: Scaling up Inference Acceleration of Large Language Models via Training-Time Test},
  author  = {Li, Yuhui and Wei, Fangyun and Zhang, Chao and Zhang, Hongyang},
  journal = {arXiv preprint arXiv:2503.01840},
  year    = {2025}
}""",
}


def public(obj: Any) -> Any:
    """`obj` with every absolute local path replaced by its last component (cards and provenance travel)."""
    if isinstance(obj, dict):
        return {k: public(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [public(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("/") and "\n" not in obj and " " not in obj:
        return PurePath(obj).name
    return obj


def _temperature(t: Any) -> str:
    return "T = 0 (greedy)" if t in (0, 0.0) else f"T = {float(t):g}"


def data_words(data: dict[str, Any] | None, base_model: str) -> str:
    """The training data in words: whose responses, to which prompts, at which temperatures, how many tokens."""
    if not data:
        return "not recorded"
    pieces = []
    for p in recorded_parts(data):
        prompts = (p.get("prompts") or {}).get("source") or p.get("dataset")
        skip = (p.get("prompts") or {}).get("skip")
        past = f" past the first {skip}" if skip else ""  # e.g. a benchmark's prompts past the evaluated ones
        settings = p.get("settings") or p  # older runs recorded the settings flat
        rows = (p.get("counts") or {}).get("rows")
        if settings.get("backend") == "given":
            who = f"responses the target had written (source `{prompts}`)"
        else:
            who = f"{base_model}'s own answers" + (f" to `{prompts}` prompts{past}" if prompts else "")
        at = f" at {_temperature(settings['temperature'])}" if settings.get("temperature") is not None else ""
        cap = f", ≤ {settings['max_new_tokens']} new tokens" if settings.get("max_new_tokens") else ""
        pieces.append(f"{rows:,} {who}{at}{cap}" if isinstance(rows, int) else f"{who}{at}{cap}")
    total = data.get("num_tokens")
    tail = f" — {data['num_docs']:,} documents, {total:,} tokens" if isinstance(total, int) and isinstance(
        data.get("num_docs"), int) else ""
    return "; ".join(pieces) + tail if pieces else "not recorded"


def objective_words(train: dict[str, Any] | None) -> str:
    loss = (train or {}).get("loss")
    name = loss.get("name") if isinstance(loss, dict) else loss
    if not name:
        return "not recorded"
    entry = LOSSES.get(str(name))
    text = entry.description if entry else str(name)
    flat = loss if isinstance(loss, dict) else (train or {})
    if entry is not None and entry.uses_eta and flat.get("eta") is not None:
        text += f" (η = {float(flat['eta']):g})"
    text = text[:1].upper() + text[1:] + f" (`{name}`)"
    if flat.get("gamma") is not None:
        text += f"; head k weighted γ^(k−1), γ = {float(flat['gamma']):g}"
    return text


def start_words(train: dict[str, Any] | None, start: dict[str, Any] | None, epochs: Any) -> str:
    draft = (train or {}).get("draft") or {}
    init = (start or {}).get("init") or draft.get("init") or "random"
    how = ("target initialization (the target's lm_head and embedding plus least-squares state maps)"
           if init == "target" else "random initialization")
    frozen = "; vocabulary tensors frozen" if draft.get("freeze") else ""
    return (f"{epochs} epochs from {how}" if epochs is not None else f"from {how}") + frozen


def vocab_words(draft_config: dict[str, Any], start: dict[str, Any] | None, exported_rows: int) -> str:
    n, V = draft_config.get("draft_vocab_size"), draft_config.get("vocab_size")
    if not n or n == V:
        return f"the full target vocabulary ({V:,} tokens)"
    vocab = (start or {}).get("vocab") or {}
    cov = (vocab.get("coverage") or {}).get("training response tokens")
    text = f"{n:,}-token draft vocabulary (a token map, chosen by {vocab.get('rank', 'target mass')}"
    text += f"; {cov:.1%} of the training responses' tokens)" if cov is not None else ")"
    if exported_rows != n:
        text += f", exported with {exported_rows:,}-row heads that give every other token logit −30000"
    return text


def model_index(rows: Sequence[dict[str, Any]], *, base_model: str, license_id: str, tags: list[str],
                model_name: str, draft_label: str | None = None) -> ModelCardData:
    """The card's YAML front matter: one `model-index` result per benchmark and temperature (sampled drafts)."""
    results, seen = [], set()
    for r in rows:
        bench = str(r.get("benchmark"))
        if bench not in HUB_DATASETS or (draft_label is not None and r.get("draft") != draft_label):
            continue
        T = float(r["temperature"])
        if (T > 0 and r.get("rule") != "sampled") or (bench, T) in seen:
            continue  # one value per (benchmark, T): sampled drafts, what a probabilistic engine gets (at T = 0
            # the rules coincide and the eval file holds both)
        seen.add((bench, T))
        hub_id, name = HUB_DATASETS[bench]
        tau = float(r["tau"])
        if not math.isfinite(tau):
            continue
        results.append(EvalResult(task_type=TASK[0], task_name=TASK[1], dataset_type=hub_id, dataset_name=name,
                                  metric_type=METRIC, metric_name=f"Acceptance Length (T={T:g})",
                                  metric_value=round(tau, 3), metric_config=f"temperature={T:g}"))
    return ModelCardData(base_model=base_model, license=license_id, tags=tags, library_name="lkspec",
                         model_name=model_name, eval_results=results or None)


def comparison(rows: Sequence[dict[str, Any]], differences: Sequence[dict[str, Any]], this: str | None) -> str:
    """Every draft of the eval file on the benchmark mean (T = 0, T = 1 sampled / greedy), and the paired
    differences of this draft against the others, when the file evaluated more than one."""
    labels = list(dict.fromkeys(str(r["draft"]) for r in rows))
    if len(labels) < 2:
        return ""
    mean = {(str(r["draft"]), float(r["temperature"]), str(r["rule"])): r for r in rows if r.get("benchmark") == "mean"}
    cols = [(0.0, "sampled", "T = 0"), (1.0, "sampled", "T = 1, sampled drafts"),
            (1.0, "greedy", "T = 1, greedy drafts")]
    cols = [c for c in cols if any((lab, c[0], c[1]) in mean for lab in labels)]

    def cell(r: dict[str, Any] | None) -> str:
        return "—" if r is None else f"{r['tau']:.3f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"

    lines = ["| draft | " + " | ".join(c[2] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for lab in labels:
        name = f"**{lab}** (this draft)" if lab == this else f"`{lab}`"
        lines.append(f"| {name} | " + " | ".join(cell(mean.get((lab, t, rule))) for t, rule, _ in cols) + " |")
    paired = [d for d in differences if d.get("benchmark") == "mean" and this in (d.get("draft"), d.get("baseline"))]
    for d in paired:
        T = float(d["temperature"])
        if T == 0 and d.get("rule") != "sampled":
            continue
        rule = "" if T == 0 else f", {d['rule']} drafts"
        lo, hi = d["ci95"]
        lines.append(f"\nPaired on the same target samples, T = {T:g}{rule}: `{d['draft']}` − `{d['baseline']}` = "
                     f"{d['delta_tau']:+.4f} tokens, 95% CI [{lo:+.4f}, {hi:+.4f}]"
                     + (" (excludes 0)" if lo > 0 or hi < 0 else " (contains 0)"))
    return "\n".join(lines)
