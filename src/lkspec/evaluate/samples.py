"""Target sample paths for the coupling replay: generated once, batched, cached, reused by every draft.

The replay (DESIGN §3) needs, per prompt, one response y drawn from the target at temperature T (greedy
at T = 0) and the target's post-norm hidden states along it. Generation is the expensive part of an
evaluation, so it runs once per (target, benchmark, T, top-k, top-p, seed, max_new_tokens), batched with
left padding, and is cached under `$LKSPEC_CACHE/eval-samples/`; every further draft, loss, K or
acceptance rule only pays a teacher-forced draft pass.

Each prompt draws its tokens from its own `torch.Generator` (seeded from the seed, benchmark and prompt
id, one uniform per token via the inverse CDF), so a prompt's sample does not depend on which other
prompts share its batch or on the batch size: a run over 20 prompts reuses the first 10 cached by an
earlier run over 10. The hidden states are the very ones the loop sampled from, so the replay's p is
exactly the distribution y was drawn from.

Stored rows: for a prompt of P tokens and n response tokens, hidden rows are the post-norm states at
positions P-2 .. P+n-2 (n+1 rows). Row 0 is the draft's anchor for the first round (it produced the last
prompt token); row i+1 gives the target's distribution of response token i.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from safetensors import safe_open
from tqdm.auto import tqdm

from lkspec.config import StrictModel
from lkspec.data.source import Doc
from lkspec.errors import LkspecError
from lkspec.io import load_tensors, save_tensors, write_json
from lkspec.targets import Target, cache_dir, decode_batch

log = logging.getLogger(__name__)

SAMPLES_FORMAT = "lkspec-samples/1"


class SampleSettings(StrictModel):
    """Everything that decides a target sample path (besides the target and the prompt)."""

    temperature: float = Field(ge=0, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    top_p: float = Field(1.0, gt=0, le=1, description="1 disables top-p")
    seed: int | None = Field(0, description="dropped (None) at T = 0, where the path is deterministic")
    max_new_tokens: int = Field(256, ge=1)

    def normalized(self) -> SampleSettings:
        """At T = 0 the seed and the filters do not change the path, so they are not part of the key."""
        if self.temperature == 0:
            return SampleSettings(temperature=0.0, seed=None, max_new_tokens=self.max_new_tokens)
        return self


@dataclass
class Prompt:
    benchmark: str
    id: str
    ids: list[int]


@dataclass
class Sample:
    """One target response y to one prompt, with the target's post-norm hidden states along it."""

    benchmark: str
    id: str
    prompt_len: int
    ids: torch.Tensor  # [P + n] int64: prompt then response
    hidden: torch.Tensor  # [n + 1, H]: positions P-2 .. P+n-2
    finished: bool  # the response ends with an EOS token (else it hit max_new_tokens)

    @property
    def n(self) -> int:
        return int(self.ids.shape[0]) - self.prompt_len

    @property
    def response(self) -> torch.Tensor:
        return self.ids[self.prompt_len :]

    @property
    def draft_ids(self) -> torch.Tensor:
        """Token ids at positions P-2 .. P+n-2, aligned row for row with `hidden`."""
        return self.ids[self.prompt_len - 2 : self.prompt_len + self.n - 1]

    def as_doc(self, row: int) -> Doc:
        """This sample as a training document (`lkspec.data.features.Doc`), loss on the response tokens.

        Lets tests and benchmarks train a draft with `lkspec.train` on the very paths the replay scores.
        """
        mask = torch.zeros(self.n + 1, dtype=torch.bool)
        mask[2:] = True  # rows 0, 1 are the last two prompt tokens; row i+2 is response token i
        return Doc(row, self.draft_ids.clone(), mask, self.hidden)


def prompt_seed(seed: int, benchmark: str, prompt_id: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{benchmark}\0{prompt_id}".encode()).hexdigest()
    return int(digest[:15], 16)


def generate_batch(
    target: Target,
    prompts: Sequence[Sequence[int]],
    settings: SampleSettings,
    generators: Sequence[torch.Generator] | None = None,
    on_step: Any = None,
) -> list[tuple[list[int], torch.Tensor, bool]]:
    """Sample responses for a batch of prompts; returns (response ids, hidden [n+1, H], finished) per prompt.

    `lkspec.targets.decode` rather than HF `generate`, because the draft must be warped with
    `lkspec.sampling.warp_probs` as p is, and the replay needs the very post-norm states p was sampled from.
    """
    s = settings
    out = decode_batch(target, prompts, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                       max_new_tokens=s.max_new_tokens, generators=generators, on_step=on_step)
    return [(d.tokens, d.hidden, d.finished) for d in out]


# ----------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------
def weights_fingerprint(target: Target) -> str:
    """A cheap hash of the target's weights (a strided sample of every tensor) and config.

    The identity (name, shapes, tokenizer) says whether a draft *fits* a target; a cache of samples
    must also tell apart two checkpoints with the same tokenizer and shapes (e.g. a fine-tune).
    """
    cached = getattr(target, "_lkspec_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha256(target.model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in target.model.state_dict().items():
            flat = p.reshape(-1)
            step = max(1, flat.numel() // 4096)
            h.update(name.encode())
            h.update(flat[::step].float().cpu().numpy().tobytes())
    digest = h.hexdigest()[:32]
    target._lkspec_fingerprint = digest  # type: ignore[attr-defined]
    return digest


def sample_key(target: Target, benchmark: str, settings: SampleSettings) -> dict[str, Any]:
    return {
        "format": SAMPLES_FORMAT,
        "target": target.identity.model_dump(),
        "weights": weights_fingerprint(target),
        "benchmark": benchmark,
        "settings": settings.normalized().model_dump(),
    }


class SampleCache:
    """Samples of one (target, benchmark, settings), in safetensors shards written atomically.

    Shards are found by listing the directory and reading each one's metadata, so there is no index
    file to corrupt or race on; a crash mid-write leaves only a temp file that is never read.
    """

    def __init__(self, root: Path, key: dict[str, Any]) -> None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        s = key["settings"]
        slug = f"{key['benchmark']}-T{s['temperature']:g}-s{s['seed']}-n{s['max_new_tokens']}"
        self.key = key
        self.dir = root / f"{slug}-{digest}"

    def index(self) -> dict[str, tuple[Path, int, dict[str, Any]]]:
        out: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        if not self.dir.is_dir():
            return out
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            try:
                with safe_open(str(shard), framework="pt") as f:
                    records = json.loads((f.metadata() or {})["records"])
            except Exception:  # an unreadable shard is skipped; its prompts are regenerated
                log.warning("ignoring unreadable sample shard %s", shard)
                continue
            for j, rec in enumerate(records):
                out[rec["id"]] = (shard, j, rec)
        return out

    def load(self, prompts: Sequence[Prompt]) -> dict[str, Sample]:
        """Cached samples of these prompts (those whose stored prompt tokens still match)."""
        index = self.index()
        wanted = [p for p in prompts if p.id in index]
        by_shard: dict[Path, list[Prompt]] = {}
        for p in wanted:
            by_shard.setdefault(index[p.id][0], []).append(p)
        out: dict[str, Sample] = {}
        for shard, ps in by_shard.items():
            t = load_tensors(shard)
            io, ho = t["ids_offsets"].tolist(), t["hidden_offsets"].tolist()
            for p in ps:
                _, j, rec = index[p.id]
                ids = t["ids"][io[j] : io[j + 1]].long()
                if rec["prompt_len"] != len(p.ids) or ids[: len(p.ids)].tolist() != list(p.ids):
                    continue  # the prompt changed (benchmark data or template): regenerate it
                out[p.id] = Sample(p.benchmark, p.id, rec["prompt_len"], ids, t["hidden"][ho[j] : ho[j + 1]],
                                   bool(rec["finished"]))
        return out

    def save(self, samples: Sequence[Sample]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "key.json").is_file():
            write_json(self.dir / "key.json", self.key)
        ids = [s.ids for s in samples]
        hid = [s.hidden for s in samples]
        io = torch.tensor([0, *torch.tensor([len(x) for x in ids]).cumsum(0).tolist()])
        ho = torch.tensor([0, *torch.tensor([len(x) for x in hid]).cumsum(0).tolist()])
        records = [{"id": s.id, "prompt_len": s.prompt_len, "finished": s.finished} for s in samples]
        name = hashlib.sha256("\0".join(r["id"] for r in records).encode()).hexdigest()[:16]
        path = self.dir / f"shard-{name}.safetensors"
        save_tensors(path, {"ids": torch.cat(ids).to(torch.int64), "hidden": torch.cat(hid).contiguous(),
                            "ids_offsets": io, "hidden_offsets": ho},
                     metadata={"records": json.dumps(records), "format": SAMPLES_FORMAT})
        return path


def samples_root() -> Path:
    return cache_dir() / "eval-samples"


@dataclass
class SampleRun:
    samples: list[Sample]
    generated: int  # prompts generated in this call (the rest came from the cache)
    generated_tokens: int
    seconds: float  # wall time spent generating (0 when everything was cached)


def target_samples(
    target: Target,
    prompts: Sequence[Prompt],
    settings: SampleSettings,
    *,
    batch_size: int = 16,
    use_cache: bool = True,
    root: Path | None = None,
    progress: bool = True,
    desc: str = "target samples",
) -> SampleRun:
    """The target's sample path for each prompt (cached ones are loaded, missing ones generated in batches)."""
    if batch_size < 1:
        raise LkspecError(f"batch size must be >= 1, got {batch_size}")
    settings = settings.normalized()
    benchmarks = {p.benchmark for p in prompts}
    if len(benchmarks) > 1:
        raise ValueError("target_samples takes the prompts of one benchmark at a time")
    bench = next(iter(benchmarks)) if benchmarks else ""
    cache = SampleCache(root or samples_root(), sample_key(target, bench, settings))
    have = cache.load(prompts) if use_cache else {}
    missing = [p for p in prompts if p.id not in have]
    t0 = time.perf_counter()
    new_tokens = 0
    if missing:
        order = sorted(missing, key=lambda p: len(p.ids))  # similar lengths share a batch: less padding
        bar = tqdm(total=len(order) * settings.max_new_tokens, desc=desc, unit="tok", disable=not progress,
                   leave=False)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            gens = None
            if settings.temperature > 0:
                seed = settings.seed or 0
                gens = [torch.Generator(device=target.device).manual_seed(prompt_seed(seed, p.benchmark, p.id))
                        for p in chunk]
            results = generate_batch(target, [p.ids for p in chunk], settings, gens, on_step=bar.update)
            done = []
            for p, (resp, hidden, fin) in zip(chunk, results, strict=True):
                ids = torch.tensor([*p.ids, *resp], dtype=torch.long)
                done.append(Sample(p.benchmark, p.id, len(p.ids), ids, hidden, fin))
                have[p.id] = done[-1]
                new_tokens += len(resp)
            bar.total = bar.n + (len(order) - start - len(chunk)) * settings.max_new_tokens
            bar.refresh()
            if use_cache:
                cache.save(done)
        bar.close()
    return SampleRun([have[p.id] for p in prompts], len(missing), new_tokens,
                     time.perf_counter() - t0 if missing else 0.0)
