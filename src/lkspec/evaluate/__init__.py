"""Exact acceptance length tau by coupling replay (DESIGN §3).

    samples.py  target sample paths (generated once, batched, cached) with hidden states along them
    replay.py   teacher-forced draft pass, exact acceptance per rule, backward recursion
    report.py   bootstrap CIs, paired differences, JSON / markdown / PNG
    run.py      `lkspec eval`: validation and the loop over benchmarks, temperatures, seeds, drafts
"""

from lkspec.evaluate.replay import RULES, DraftTrace, PromptReplay, draft_traces, replay_counts, replay_trace
from lkspec.evaluate.report import RESULTS_FORMAT, EvalReport
from lkspec.evaluate.run import DraftEntry, EvalSettings, eval_settings, evaluate, load_drafts, run_eval
from lkspec.evaluate.samples import Prompt, Sample, SampleSettings, target_samples

__all__ = [
    "RESULTS_FORMAT",
    "RULES",
    "DraftEntry",
    "DraftTrace",
    "EvalReport",
    "EvalSettings",
    "Prompt",
    "PromptReplay",
    "Sample",
    "SampleSettings",
    "draft_traces",
    "eval_settings",
    "evaluate",
    "load_drafts",
    "replay_counts",
    "replay_trace",
    "run_eval",
    "target_samples",
]
