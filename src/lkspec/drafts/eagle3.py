"""EAGLE-3 (Li et al. 2025): one decoder layer over fused low/mid/high target states, unrolled on its own outputs.

What makes it different from the other two drafts is that it attends: step 1 at position t reads the fused
target states of every position <= t, so the draft carries a KV cache of its own across rounds
(`Eagle3Context`), and its later steps feed back their own pre-norm outputs. Per step (vLLM's
`llama_eagle3.py` form, names as in its checkpoints):

    x      = fc(cat[a_low, a_mid, a_high])        step 1 only: the target's aux states at position t
    u      = cat[input_layernorm(embed(y)), hidden_norm(x)]        [2H], y the token after t
    r      = x + o_proj(attention(q, k, v of u; RoPE at the step's position))
    g      = r + mlp(post_attention_layernorm(r))                   pre-norm output, the next step's x
    logits = lm_head(norm(g))                                       over the draft vocabulary (d2t in vLLM)

Teacher-forced, as trained and as the coupling replay needs it ("training-time test", `head_states`): step j
at anchor t sits at position t + j - 1 and attends to step 1's keys at positions <= t (the context a round
starts from) plus its own chain's keys of steps 2..j (the positions it drafted), exactly what a round of
the generator computes when every earlier draft was accepted. So replay, training and generation share
one definition, and the per-anchor chains run for all anchors at once.

The token embedding is the target's, frozen (copied in `adopt_target`, saved with the draft so a
checkpoint is self-contained). The aux layers are indices into HF's `output_hidden_states` (the input to
that decoder layer), vLLM's default (2, L // 2, L - 3) unless configured.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from lkspec.data.source import Doc
from lkspec.drafts.base import Draft, DraftConfig, register
from lkspec.drafts.llama_layer import MidLayer, RMSNorm, document_attention, document_blocks
from lkspec.drafts.target_init import InitReport, NormalEquations, TargetBasis, rms_normalise
from lkspec.errors import LkspecError
from lkspec.targets import TargetTensors


class Eagle3Config(DraftConfig):
    arch: str = "eagle3"
    aux_layers: list[int] = Field(default_factory=list, description="target layers whose input states are fused "
                                  "(HF output_hidden_states indices); empty: vLLM's (2, L // 2, L - 3)")
    num_attention_heads: int = Field(0, ge=0, description="0: the target's")
    num_key_value_heads: int = Field(0, ge=0, description="0: the target's")
    head_dim: int = Field(0, ge=0, description="0: the target's")
    intermediate_size: int = Field(0, ge=0, description="MLP width; 0: the target's")
    rope_theta: float = Field(10000.0, gt=0)
    rms_norm_eps: float = Field(1e-5, gt=0)
    max_position_embeddings: int = Field(2048, ge=1, description="written to config.json (vLLM raises it to the "
                                         "serving max_model_len)")

    @model_validator(mode="after")
    def _geometry(self) -> Eagle3Config:
        if self.aux_layers != sorted(set(self.aux_layers)):
            raise ValueError(f"aux_layers {self.aux_layers} must be distinct and ascending (vLLM concatenates the "
                             f"layers in ascending order); use {sorted(set(self.aux_layers))}")
        if self.num_attention_heads and self.num_key_value_heads and \
                self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}; use a divisor")
        return self

    @property
    def num_aux(self) -> int:
        return len(self.aux_layers) or 3


def target_geometry(target_config: Any) -> dict[str, Any]:
    """The draft layer's shapes from the target's HF config (the reference drafts copy them), and the aux layers."""
    L = int(target_config.num_hidden_layers)
    heads = int(target_config.num_attention_heads)
    hidden = int(target_config.hidden_size)
    return {
        "aux_layers": sorted({min(2, L), L // 2, max(L - 3, 0)}),  # vLLM's (2, L // 2, L - 3); distinct when L < 6
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(target_config, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(target_config, "head_dim", None) or hidden // heads),
        "intermediate_size": int(getattr(target_config, "intermediate_size", None) or 4 * hidden),
        "rope_theta": float(getattr(target_config, "rope_theta", None)  # transformers 5 keeps it in rope_parameters
                            or (getattr(target_config, "rope_parameters", None) or {}).get("rope_theta") or 10000.0),
        "rms_norm_eps": float(getattr(target_config, "rms_norm_eps", None) or 1e-5),
        "max_position_embeddings": int(getattr(target_config, "max_position_embeddings", None) or 2048),
    }


SCALES = torch.linspace(0.05, 1.0, 20)  # logit scales the target initialisation tries
SELF_ATTENTION_LOGIT = 12.0  # a token's mean attention logit on itself in the target initialisation


@dataclass
class Eagle3Context:
    """What the draft remembers between rounds: step 1's keys and values at every context position, and step 1's
    pre-norm output at the last one (where the next round's chain starts)."""

    k: torch.Tensor  # [B, nh, P, d]
    v: torch.Tensor
    last: torch.Tensor | None = None  # [B, H]

    @property
    def length(self) -> int:
        return int(self.k.shape[2])


@register
class Eagle3(Draft):
    arch = "eagle3"
    config_cls = Eagle3Config
    short = "eagle3"
    title = "EAGLE-3"
    default_eta = 3.0
    attends = True
    recurrent = True
    config: Eagle3Config

    def __init__(self, config: Eagle3Config) -> None:
        c = config
        if not (c.num_attention_heads and c.num_key_value_heads and c.head_dim and c.intermediate_size):
            heads = c.num_attention_heads or max(1, c.hidden_size // 64)
            c = c.model_copy(update={
                "num_attention_heads": heads, "num_key_value_heads": c.num_key_value_heads or heads,
                "head_dim": c.head_dim or max(1, c.hidden_size // heads),
                "intermediate_size": c.intermediate_size or 4 * c.hidden_size})
        super().__init__(c)
        H = c.hidden_size
        self.fc = nn.Linear(c.num_aux * H, H, bias=False)
        self.embed_tokens = nn.Embedding(c.vocab_size, H)
        self.embed_tokens.weight.requires_grad_(False)  # the target's (adopt_target): never trained
        self.midlayer = MidLayer(c)
        self.norm = RMSNorm(H, c.rms_norm_eps)
        self.lm_head = nn.Linear(H, c.head_rows, bias=False)

    # ----- what the trainer and the stages need to know ---------------------------------------
    @property
    def aux_layers(self) -> tuple[int, ...]:
        return tuple(self.config.aux_layers)

    @classmethod
    def target_config_defaults(cls, target_config: Any) -> dict[str, Any]:
        return target_geometry(target_config)

    def vocab_parameters(self) -> list[nn.Parameter]:
        """The head and fc: both come from the target (copied / fitted by `init_from_target`). fc's fitted entries
        are ~0.004 (the aux states are large), so Adam's first steps (~lr each) would overwrite the fit: measured,
        held-out alpha 0.22 -> 0.14 after one epoch at lr 2e-4 when fc trains; frozen, the layer learns on top."""
        return [self.lm_head.weight, self.fc.weight]

    @torch.no_grad()
    def adopt_target(self, tensors: Callable[[], TargetTensors]) -> None:
        self.embed_tokens.weight.copy_(tensors().embedding.to(self.embed_tokens.weight))

    @torch.no_grad()
    def init_from_target(self, tensors: TargetTensors, docs: Callable[[], Iterable[Doc]]) -> InitReport:
        """Start as a linear predictor of the target's next state from the aux states at t *and* the token y_{t+1}
        (the MLP-Speculator's start, `target_init`), realised in the layer's own weights:

        * the ridge fit x_{t+1} ~ A a_t + B e_{t+1} over the training features (e the RMS-normalised embedding, as
          input_layernorm gives it; x the target's next normalised state, which its lm_head turns into token t+2);
        * fc = A; the head is the target's lm_head (kept rows) behind its final-norm scale, calibrated;
        * the token enters through attention, the one path it has: queries and keys read the embedding half of
          the input through its top principal directions with a large gain, so each position attends to itself
          (or to positions with the same next token, whose values are equal); values read the embedding and
          o_proj maps them to B e (a rank nkv * head_dim factorisation of B, 192 of 576 for SmolLM2's GQA);
        * the MLP's down_proj starts at zero. Later steps add B e of their token to the previous state.
        """
        H = self.config.hidden_size
        self.embed_tokens.weight.copy_(tensors.embedding.to(self.embed_tokens.weight))
        first = [d for _, d in zip(range(64), docs(), strict=False)]
        basis = TargetBasis.of(tensors, first)
        emb = rms_normalise(tensors.embedding.float())
        A_in = self.fc.in_features
        eq = NormalEquations(A_in + H, H)
        for d in docs():
            if d.aux is None:
                raise LkspecError("a target-initialised eagle3 draft is fitted on aux states; extract the features "
                                  f"with --aux-layers {','.join(map(str, self.aux_layers))}")
            if len(d) > 1:
                eq.add(torch.cat([d.aux[:-1].float().cpu(), emb[d.input_ids[1:].long()]], 1), basis.state(d.hidden[1:]))
        sol = eq.solve()
        A, B = sol[:A_in], sol[A_in:]  # x = a @ A + e @ B
        self.fc.weight.copy_(A.T)
        attn = self.midlayer.self_attn
        nkv, d, rep = attn.nkv, attn.d, attn.nh // attn.nkv
        used = emb[torch.unique(torch.cat([x.input_ids for x in first]))] if first else emb
        pcs = torch.linalg.svd(used - used.mean(0), full_matrices=False).Vh[:d]  # [d, H]: where tokens differ
        gain = (SELF_ATTENTION_LOGIT * math.sqrt(d) / float((used @ pcs.T).pow(2).sum(-1).mean())) ** 0.5
        U, S, Vh = torch.linalg.svd(B.T, full_matrices=False)  # B.T = U S Vh: e -> its contribution to x
        r = min(nkv * d, H)
        for w in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight):
            w.zero_()
        for g in range(nkv):
            attn.k_proj.weight[g * d : (g + 1) * d, :H] = gain * pcs
            for h in range(g * rep, (g + 1) * rep):
                attn.q_proj.weight[h * d : (h + 1) * d, :H] = gain * pcs
            lo, hi = g * d, min((g + 1) * d, r)
            if lo < hi:  # value head g carries components lo..hi of B; the group's first query head passes them on
                attn.v_proj.weight[g * d : g * d + hi - lo, :H] = Vh[lo:hi]
                attn.o_proj.weight[:, g * rep * d : g * rep * d + hi - lo] = U[:, lo:hi] * S[lo:hi]
        self.midlayer.mlp.down_proj.weight.zero_()
        rows = tensors.lm_head if self.token_map is None else tensors.lm_head[self.token_map.cpu()]
        self.lm_head.weight.copy_(rows)
        self.norm.weight.copy_(basis.scale)
        self.norm.weight.mul_(self.calibrated_scale(first, rows))
        return InitReport({"linear fit": eq.rows}, "final norm" if tensors.norm_scale is not None else "scalar")

    @torch.no_grad()
    def calibrated_scale(self, docs: list[Doc], rows: torch.Tensor, max_tokens: int = 4096) -> float:
        """The logit scale c that minimises step 1's KL(p || q) on `docs` (p: the target at t+1 over the kept rows,
        renormalised as the truncated loss does). A least-squares prediction averages the possible next states and
        is renormalised to the target's own RMS, so at c = 1 it is as confident as the target while pointing
        between tokens; left so, training's first steps spend themselves flattening it. Calibrated, KL's gradient
        has no global-scale part at the start (measured: held-out KL 4.06 -> 3.22 at the same alpha)."""
        zs, ps, n = [], [], 0
        for d in docs:
            if d.aux is None or len(d) < 2 or n >= max_tokens:
                continue
            zs.append(self(d.aux[None], d.input_ids[None])[0][0].float()[:, self.token_map
                                                                        if self.token_map is not None else slice(None)])
            ps.append(d.hidden[1:].float() @ rows.float().T)
            n += len(d) - 1
        if not zs:
            return 1.0
        z, logp = torch.cat(zs), torch.log_softmax(torch.cat(ps), -1)
        kl = [float((logp.exp() * (logp - torch.log_softmax(k * z, -1))).sum(-1).mean()) for k in SCALES]
        return float(SCALES[int(torch.tensor(kl).argmin())])

    def head_weight(self, k: int) -> torch.Tensor:
        return self.lm_head.weight

    # ----- teacher-forced: every anchor's chain at once ----------------------------------------
    def head_states(self, hidden: torch.Tensor, input_ids: torch.Tensor, *, first: int = 0,
                    segments: torch.Tensor | None = None, anchors: torch.Tensor | None = None) -> list[torch.Tensor]:
        """hidden [B, T, A*H]: the target's aux states; head k -> [B, T-k-first, H] for anchors first..T-k-1.

        Step 1 runs over every anchor (they are the keys of every later query); `segments` [B, T] keeps packed
        documents from attending to each other. Scores are computed per document (`document_attention`), not over the
        packed row with a mask: a 2048-token row of ~250-token documents has 1/8 of the row's T^2 scores.

        `anchors` [B, T] bool: the only anchors whose states the caller reads (a training row's trained anchors);
        every other anchor's state is returned as zeros. Step 1's keys still cover every position, but only these
        anchors run the layer's queries, MLP and chain: a demo row is ~58 % prompt, which no head is trained on.
        """
        B, T, _ = hidden.shape
        if input_ids.shape[:2] != (B, T):
            raise LkspecError(f"hidden {tuple(hidden.shape)} and input_ids {tuple(input_ids.shape)} disagree on [B, T]")
        if hidden.shape[-1] != self.fc.in_features:
            raise LkspecError(f"an eagle3 draft reads {self.config.num_aux} target layers ({self.fc.in_features} "
                              f"features per token) but got {hidden.shape[-1]}; use features with aux layers "
                              f"{list(self.aux_layers)}")
        if B > 1 and (segments is not None or anchors is not None):  # documents and anchors differ per row
            rows = [self.head_states(hidden[i : i + 1], input_ids[i : i + 1], first=first,
                                     segments=None if segments is None else segments[i : i + 1],
                                     anchors=None if anchors is None else anchors[i : i + 1]) for i in range(B)]
            return [torch.cat(parts) for parts in zip(*rows, strict=True)]
        layer, attn = self.midlayer, self.midlayer.self_attn
        dev = hidden.device
        ids = input_ids.to(dev).long()
        n1 = max(T - 1, 0)
        blocks = document_blocks(None if segments is None else segments[0, :n1], n1)
        at = torch.arange(min(first, n1), n1, device=dev)  # anchors computed, ascending
        if anchors is not None:
            if anchors.dtype != torch.bool:
                raise LkspecError(f"anchors must be a bool mask [B, T], got {anchors.dtype}")
            at = at[anchors[0, first:n1].to(dev)]
        at_list = at.tolist()
        x = self.fc(self._as_param_dtype(hidden[:, :n1]))
        u = layer.inputs(self.embed_tokens(ids[:, 1 : 1 + n1]), x)
        k1, v1 = attn.kv(u, torch.arange(n1, device=dev))
        scale = 1.0 / math.sqrt(attn.d)
        o, _ = document_attention(attn.q(u[:, at], at), k1, v1, blocks, at, scale)
        g = layer.finish(x[:, at], o)
        out = [self._dense(self.norm(g), at, max(n1 - first, 0), first)]
        chain_k, chain_v = [], []
        for j in range(2, self.num_heads + 1):
            n = bisect.bisect_left(at_list, T - j)  # anchors <= T-j-1: their chain's token j exists
            at, g = at[:n], g[:, :n]
            q, kj, vj = attn.qkv(layer.inputs(self.embed_tokens(ids[:, at + j]), g), at + (j - 1))
            chain_k = [c[:, :, :n] for c in chain_k] + [kj]
            chain_v = [c[:, :, :n] for c in chain_v] + [vj]
            o_ctx, lse_ctx = document_attention(q, k1, v1, blocks, at, scale)
            own = torch.stack([(q * c).sum(-1) for c in chain_k], -1) * scale  # [B, nh, n, j-1]
            lse = torch.logaddexp(lse_ctx, torch.logsumexp(own, -1))  # one softmax over context and chain
            o = (lse_ctx - lse).exp()[..., None] * o_ctx + \
                ((own - lse[..., None]).exp()[..., None] * torch.stack(chain_v, -2)).sum(-2)
            g = layer.finish(g, o)
            out.append(self._dense(self.norm(g), at, max(T - j - first, 0), first))
        return out

    @staticmethod
    def _dense(states: torch.Tensor, at: torch.Tensor, n: int, first: int) -> torch.Tensor:
        """States at anchors `at` [m] -> [B, n, H] over anchors first..first+n-1, zeros where none was computed."""
        if states.shape[1] == n:
            return states
        return states.new_zeros(states.shape[0], n, states.shape[2]).index_copy(1, at - first, states)

    def head_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, *, first: int = 0) -> list[torch.Tensor]:
        return [s @ self.lm_head.weight.T for s in self.head_states(hidden, input_ids, first=first)]

    # ----- generation: a context that grows round by round ------------------------------------
    def new_context(self, batch: int = 1) -> Eagle3Context:
        p = self.lm_head.weight
        a = self.midlayer.self_attn
        z = p.new_zeros(batch, a.nh, 0, a.d)
        return Eagle3Context(z, z.clone())

    @torch.no_grad()
    def extend(self, ctx: Eagle3Context, features: torch.Tensor, next_tokens: torch.Tensor) -> None:
        """Append context pairs (aux states at positions P..P+n-1 [B, n, A*H], the token after each [B, n])."""
        layer, attn = self.midlayer, self.midlayer.self_attn
        n, P = features.shape[1], ctx.length
        pos = torch.arange(P, P + n, device=self.fc.weight.device)
        x = self.fc(self._as_param_dtype(features))
        q, k, v = attn.qkv(layer.inputs(self.embed_tokens(next_tokens.to(x.device).long()), x), pos)
        ctx.k, ctx.v = torch.cat([ctx.k, k], 2), torch.cat([ctx.v, v], 2)
        allowed = torch.arange(P + n, device=x.device)[None, :] <= pos[:, None]
        o = torch.softmax(((q @ ctx.k.transpose(-1, -2)) / math.sqrt(attn.d)).masked_fill(~allowed, float("-inf")),
                          -1) @ ctx.v
        ctx.last = layer.finish(x, o)[:, -1]

    def _propose_logits(self, hidden: torch.Tensor, last_token: torch.Tensor, num_tokens: int,
                        pick: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise LkspecError("an eagle3 draft proposes from its context; call propose_in(context, ...)")

    def propose_chain(self, ctx: Eagle3Context, num_tokens: int, pick: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if ctx.last is None:
            raise LkspecError("the eagle3 context is empty; extend it with the prompt's features first")
        layer, attn = self.midlayer, self.midlayer.self_attn
        g = ctx.last[:, None]  # [B, 1, H]
        keys, values = ctx.k, ctx.v
        start = ctx.length - 1  # the position of the context's last pair: step j sits at start + j - 1
        tokens, probs = [], []
        for j in range(1, num_tokens + 1):
            token, q_dist = pick(self.lm_head(self.norm(g[:, 0])))
            tokens.append(token)
            probs.append(q_dist)
            if j == num_tokens:
                break
            pos = torch.tensor([start + j], device=g.device)
            q, k, v = attn.qkv(layer.inputs(self.embed_tokens(token[:, None]), g), pos)
            keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
            o = torch.softmax((q @ keys.transpose(-1, -2)) / math.sqrt(attn.d), -1) @ values
            g = layer.finish(g, o)
        return torch.stack(tokens, 1), torch.stack(probs, 1)

    def layer_config(self) -> dict[str, Any]:
        """The decoder layer as a Llama config (what both served layouts describe it with)."""
        c = self.config
        return {
            "model_type": "llama",
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "num_hidden_layers": 1,
            "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta,
            "max_position_embeddings": c.max_position_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "vocab_size": c.vocab_size,
            "tie_word_embeddings": False,
        }

    def vllm_config(self) -> dict[str, Any]:
        """The native EAGLE-3 layout (vLLM's `LlamaForCausalLMEagle3`, as the authors' checkpoints). The residual
        is the raw input (norm_before_residual false: written out, vLLM's speculators path defaults it to true)."""
        c = self.config
        return {
            "architectures": ["LlamaForCausalLMEagle3"],
            **self.layer_config(),
            "draft_vocab_size": c.head_rows,
            "norm_before_residual": False,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(c.aux_layers)},
        }

    def served_tensors(self) -> dict[str, torch.Tensor]:
        """vLLM's tensor names: the module's own, and for a truncated head d2t (target id = draft id + d2t, int64)
        and t2d (bool [V]) instead of the token map; vLLM has no d2t parameter for a full-vocabulary head."""
        out = {k: v for k, v in self.state_dict().items() if k != "token_map"}
        if self.token_map is not None:
            n = self.token_map.numel()
            out["d2t"] = self.token_map.cpu() - torch.arange(n)
            t2d = torch.zeros(self.config.vocab_size, dtype=torch.bool)
            t2d[self.token_map.cpu()] = True
            out["t2d"] = t2d
        return out
