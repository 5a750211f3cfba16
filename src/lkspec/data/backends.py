"""Generation backends: how a batch of prompt token ids becomes the target's responses.

Each backend is a function (or callable) `(target, prompts, sampling, max_new_tokens, seed) -> [Generated]`
that samples reproducibly from the batch seed, so a resumed batch samples exactly what it would have: `hf`
runs the transformers model through lkspec's KV-cache loop (`lkspec.targets.decode`, one generator per row
derived from the batch seed) and can hand back the post-norm states it sampled from (`keep_states`, for the
feature store: `lkspec.data.states`); `vllm` gives every request its own derived seed (results do not depend on
vLLM's batching) and keeps no states. `given_response` tokenizes a response the target already wrote, as its
chat template places it.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lkspec.data.prompts import PromptRecord
from lkspec.errors import LkspecError
from lkspec.targets import Target, decode_batch

VLLM_INSTALL = "vLLM is not installed: `pip install vllm` on a GPU machine, or use --backend hf"


@dataclass
class Generated:
    response: list[int]  # ends with an EOS token unless the limit was hit
    finish_reason: str  # "eos" | "length"
    hidden: torch.Tensor | None = None  # keep_states: post-norm states at every prompt and response position
    aux: torch.Tensor | None = None  # ... and the aux layers' input states, when asked for


def derive_seed(seed: int, index: int) -> int:
    """Independent, reproducible seed per (run seed, batch): resumed batches sample what they would have."""
    return int.from_bytes(hashlib.sha256(f"lkspec:{seed}:{index}".encode()).digest()[:8], "little") >> 1


def cut_at_eos(tokens: list[int], eos: set[int], limit: int) -> Generated:
    """Keep tokens up to and including the first EOS; drop what follows (padding)."""
    for i, tok in enumerate(tokens[:limit]):
        if tok in eos:
            return Generated(tokens[: i + 1], "eos")
    return Generated(tokens[:limit], "length")


def hf_generate(target: Target, prompts: list[list[int]], sampling: dict[str, Any], max_new_tokens: int,
                seed: int, *, keep_states: bool = False, aux_layers: Sequence[int] = ()) -> list[Generated]:
    """One left-padded batch through the target's KV-cache loop; row i samples from a generator seeded by
    `derive_seed(seed, i)`. `keep_states` returns every position's post-norm state (and `aux_layers`' inputs)."""
    temperature = sampling["temperature"]
    gens = None if temperature == 0 else [torch.Generator(device=target.device).manual_seed(derive_seed(seed, i))
                                          for i in range(len(prompts))]
    out = decode_batch(target, prompts, temperature=temperature, top_k=sampling["top_k"] or 0,
                       top_p=sampling["top_p"] if sampling["top_p"] is not None else 1.0,
                       max_new_tokens=max_new_tokens, generators=gens, keep="all" if keep_states else "tail",
                       aux_layers=aux_layers if keep_states else ())
    return [Generated(d.tokens, "eos" if d.finished else "length", d.hidden if keep_states else None, d.aux)
            for d in out]


class VllmBackend:
    """vLLM with one seed per request (derived from the batch seed), so results do not depend on batching."""

    def __init__(self, target: Target) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise LkspecError(VLLM_INSTALL)
        import vllm

        source = getattr(target.model, "name_or_path", None) or target.name
        self.vllm = vllm
        self.llm = vllm.LLM(model=str(source), tokenizer=str(source))
        self.eos = list(target.eos_token_ids)

    def __call__(self, target: Target, prompts: list[list[int]], sampling: dict[str, Any], max_new_tokens: int,
                 seed: int) -> list[Generated]:
        params = [
            self.vllm.SamplingParams(
                n=1, temperature=sampling["temperature"], top_k=sampling["top_k"] or -1, top_p=sampling["top_p"],
                max_tokens=max_new_tokens, seed=derive_seed(seed, i), stop_token_ids=self.eos, detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        eos = set(self.eos)
        result = []
        for o in outs:
            toks = list(o.outputs[0].token_ids)
            if o.outputs[0].finish_reason == "stop" and (not toks or toks[-1] not in eos):
                reason = o.outputs[0].stop_reason
                toks.append(reason if isinstance(reason, int) else self.eos[0])  # the response keeps its EOS
            result.append(cut_at_eos(toks, eos, max_new_tokens))
        return result


def given_response(target: Target, rec: PromptRecord, prompt: list[int], max_new_tokens: int) -> Generated:
    """Tokens of a response the target already wrote, as the chat template places them (with its end token)."""
    assert rec.response is not None
    eos = set(target.eos_token_ids)
    full = target.render_chat([*rec.messages, {"role": "assistant", "content": rec.response}],
                              add_generation_prompt=False)
    if full[: len(prompt)] == prompt and any(t in eos for t in full[len(prompt):]):
        tokens = full[len(prompt):]
    else:  # a template that rewrites earlier turns: tokenize the text and close it with the EOS token
        end = target.tokenizer.eos_token_id if target.tokenizer.eos_token_id in eos else target.eos_token_ids[0]
        tokens = [*target.tokenizer(rec.response, add_special_tokens=False)["input_ids"], end]
    return cut_at_eos(tokens, eos, max_new_tokens)
