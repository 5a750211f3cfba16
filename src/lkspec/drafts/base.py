"""What every draft architecture shares: the alignment contract, `propose`, save/load, the registry.

Alignment (DESIGN §1). `h_t` is the target's post-norm hidden state at position t (it produces the
distribution of token t+1). Head k (1-based) at anchor t predicts token t+k+1, and its target
distribution is the target's own next-token distribution at position t+k, softmax(lm_head(h_{t+k})).
A teacher-forced `forward(hidden [B,T,H], input_ids [B,T])` therefore returns, for head k, logits of
shape [B, T-k, V] for anchors t = 0..T-k-1; `target_logits[:, k:]` lines up with it row for row.

Truncated draft vocabulary (paper §4.4). With `draft_vocab_size` N < V the heads have N rows and the
draft carries `token_map` [N] (the target ids of its rows, ascending; saved with the weights under
vLLM MEDUSA's name). Training uses the N-row logits directly; `forward` and `propose` hand out
distributions over the target's V tokens with zeros outside the map, so the replay and the generator
treat every draft alike.

A checkpoint directory is what vLLM loads (config.json + model.safetensors in its own names), plus an
`lkspec` block in config.json with the full draft config and the target identity. Saving writes every
stage's tensors, also when weights are tied (vLLM 0.32 keeps a separate `head.i` per stage). Reading,
in that layout and every outside one, is `lkspec.drafts.checkpoint` (`load_draft`), which builds on this
module; this one imports nothing from the rest of `lkspec.drafts` or from any stage above it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from lkspec import __version__
from lkspec.config import StrictModel, parse
from lkspec.errors import LkspecError
from lkspec.io import save_tensors, write_json
from lkspec.sampling import sample, warp_probs
from lkspec.targets import TargetIdentity, TargetTensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class DraftConfig(StrictModel):
    """Fields every architecture has. Unknown keys are errors, so a typo never becomes a default."""

    arch: str
    hidden_size: int = Field(gt=0, description="target hidden size (input width)")
    vocab_size: int = Field(gt=0, description="target vocabulary size (rows of every head)")
    num_heads: int = Field(6, ge=1, description="K: tokens drafted per round (the paper uses 6)")
    draft_vocab_size: int | None = Field(None, ge=1, description="rows of every head when the draft covers only "
                                         "N < vocab_size tokens (its token_map); None: the full vocabulary")

    @property
    def head_rows(self) -> int:
        return self.draft_vocab_size or self.vocab_size

    @property
    def truncated(self) -> bool:
        return self.draft_vocab_size is not None and self.draft_vocab_size < self.vocab_size

    @model_validator(mode="after")
    def _vocab_fits(self) -> DraftConfig:
        if self.draft_vocab_size is not None and self.draft_vocab_size > self.vocab_size:
            raise ValueError(f"draft_vocab_size {self.draft_vocab_size} exceeds the target's vocab_size "
                             f"{self.vocab_size}; use at most {self.vocab_size}")
        return self


@dataclass
class LocalContext:
    """A local draft's context: the last target state [B, H] and the token after it [B]."""

    hidden: Any = None
    token: Any = None


@dataclass
class Proposal:
    """K drafted tokens per row and the distributions they were drawn from (after warping)."""

    tokens: torch.Tensor  # [B, K] int64
    probs: torch.Tensor  # [B, K, V] fp32


class Draft(torch.nn.Module, ABC):
    """Base class. Subclasses set `arch`/`config_cls` and implement the per-architecture math."""

    arch: ClassVar[str]
    config_cls: ClassVar[type[DraftConfig]]
    short: ClassVar[str]  # in run names: mlp-kl, medusa-lk_hybrid
    title: ClassVar[str] = ""  # as papers and cards write it: MLP-Speculator, MEDUSA, EAGLE-3
    default_eta: ClassVar[float] = 3.0  # the paper's eta for its L^lambda (MEDUSA's alpha rises slower: 10)

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.config = config
        self.token_map: torch.Tensor | None
        if config.truncated:
            # placeholder rows 0..N-1 until the trainer sets the real map (set_token_map)
            self.register_buffer("token_map", torch.arange(config.head_rows, dtype=torch.long))
        else:
            self.token_map = None

    def set_token_map(self, tokens: torch.Tensor) -> None:
        """The target ids of the heads' rows: N distinct ids, stored ascending."""
        if self.token_map is None:
            raise LkspecError("this draft covers the full vocabulary; set draft_vocab_size to truncate it")
        ids = torch.as_tensor(tokens, dtype=torch.long).flatten().unique(sorted=True)
        n, V = self.config.head_rows, self.config.vocab_size
        if ids.numel() != n or int(ids.min()) < 0 or int(ids.max()) >= V:
            raise LkspecError(f"a token map needs {n} distinct ids in [0, {V}); got {ids.numel()} distinct ids in "
                              f"[{int(ids.min())}, {int(ids.max())}]")
        self.token_map.copy_(ids.to(self.token_map.device))

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., N] head logits -> [..., V] over the target's vocabulary (-inf outside the token map)."""
        if self.token_map is None:
            return logits
        out = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        return out.index_copy_(-1, self.token_map, logits)

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def num_parameters(self) -> int:
        """Distinct trainable parameters (tied weights counted once)."""
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    attends: ClassVar[bool] = False  # head_states reads other positions than its anchor's chain (needs `segments`)
    recurrent: ClassVar[bool] = False  # every step shares the weights: it drafts any K (see `with_num_heads`)

    @abstractmethod
    def head_states(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forced features for each head k: [B, T-k, D_k], before its vocabulary projection. A draft that
        `attends` also takes `segments` [B, T] (document ids of a packed row), `first` (see `forward`) and `anchors`
        [B, T] bool (the only anchors whose states the trainer reads; the others may come back as zeros)."""

    @abstractmethod
    def head_weight(self, k: int) -> torch.Tensor:
        """The vocabulary projection [N, D] of head k (1-based); logits = states @ weight.T (N = head_rows)."""

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, *, first: int = 0) -> list[torch.Tensor]:
        """Per-head logits over the target's vocabulary, head k (1-based) -> [B, T-k-first, V] for anchors
        first..T-k-1; see the module docstring for alignment (a truncated draft gives -inf outside its token
        map). Positions before `first` are context only (they matter to a draft that attends)."""
        return [self.full_logits(z) for z in self.head_logits(hidden, input_ids, first=first)]

    def head_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, *, first: int = 0) -> list[torch.Tensor]:
        """`forward` over the heads' own rows ([B, T-k-first, N], N = head_rows, row i is target id
        token_map[i]): what a consumer that can work on the token map reads, without V-wide -inf padding."""
        return [s @ self.head_weight(k).T for k, s in
                enumerate(self.head_states(hidden[:, first:], input_ids[:, first:]), 1)]

    @abstractmethod
    def _propose_logits(self, hidden: torch.Tensor, last_token: torch.Tensor, num_tokens: int,
                        pick: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft `num_tokens` tokens; `pick(logits)->(tokens, probs)` chooses each one."""

    # ----- proposing: from a context that grows round by round ---------------------------------
    aux_layers: tuple[int, ...] = ()
    """The target layers this draft reads (HF `output_hidden_states` indices, concatenated); empty: the post-norm
    final state, the one the lm_head reads."""

    def with_num_heads(self, k: int) -> Draft:
        """This draft drafting k tokens per round. A recurrent draft (one set of weights for every step) runs any
        number of steps: EAGLE-3 is trained with 6 and evaluated at 7, as its authors and the LK paper do."""
        if k == self.num_heads:
            return self
        if not self.recurrent:
            raise LkspecError(f"K = {k} but the draft has {self.num_heads} heads; use --k {self.num_heads} or fewer")
        p = next(self.parameters())
        new = type(self)(self.config.model_copy(update={"num_heads": k})).to(device=p.device, dtype=p.dtype)
        new.load_state_dict(self.state_dict())
        return new.train(self.training)

    @property
    def input_width(self) -> int:
        """Features per token this draft reads: the hidden size, times the number of aux layers if it fuses them."""
        return self.config.hidden_size * max(1, len(self.aux_layers))

    def new_context(self, batch: int = 1) -> Any:
        """What the draft keeps between rounds. A local draft (its proposal reads only the last target state)
        keeps the last (state, token) pair; one that attends keeps a cache (`Eagle3Context`)."""
        return LocalContext()

    def extend(self, ctx: Any, features: torch.Tensor, next_tokens: torch.Tensor) -> None:
        """Append context pairs: the target's features at n new positions [B, n, F] and the token after each
        [B, n] (the last pair's token is the one the next round starts from)."""
        ctx.hidden, ctx.token = features[:, -1], next_tokens[:, -1]

    def propose_chain(self, ctx: Any, num_tokens: int, pick: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft `num_tokens` tokens from the context; `pick(logits)->(tokens, probs)` chooses each one."""
        return self._propose_logits(self._as_param_dtype(ctx.hidden), ctx.token.long(), num_tokens, pick)

    @torch.no_grad()
    def propose(self, hidden: torch.Tensor, last_token: torch.Tensor, **kw: Any) -> Proposal:
        """Draft K tokens from the target's last hidden state [B, H] and the token it emitted [B] (a local
        draft; see `propose_in` for the options)."""
        ctx = LocalContext()
        self.extend(ctx, hidden[:, None], last_token[:, None])
        return self.propose_in(ctx, **kw)

    @torch.no_grad()
    def propose_in(
        self,
        ctx: Any,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        num_tokens: int | None = None,
        generator: torch.Generator | None = None,
        prefix: Sequence[int] = (),
    ) -> Proposal:
        """Draft K tokens from a context (`new_context` + `extend`).

        At T > 0 each token is sampled from q (warped like the target's p); at T = 0 it is the argmax and
        q is one-hot. `prefix` forces the first tokens (q one-hot on them), e.g. an n-gram match that the
        draft continues: a chained draft then consumes them as its inputs.
        """
        k = self.num_heads if num_tokens is None else num_tokens
        if not 1 <= k <= self.num_heads:
            raise LkspecError(f"cannot draft {k} tokens with a {self.num_heads}-head draft; use K <= {self.num_heads}")
        forced = list(prefix)[:k]
        done = 0

        def pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal done
            if done < len(forced):
                tokens = torch.full(logits.shape[:-1], forced[done], dtype=torch.long, device=logits.device)
                done += 1
                return tokens, torch.nn.functional.one_hot(tokens, self.config.vocab_size).float()
            # warp and draw over the token map (the head's width), not the target's vocabulary: outside the map q
            # is 0 either way (its logits are -inf), so the distribution, the filters and the argmax's tie order
            # (the map is sorted) are the same, for a sixth of the work with an 8192-token map of 49152
            probs = warp_probs(logits, temperature, top_k, top_p)
            tokens = probs.argmax(-1) if temperature == 0 else sample(probs, generator)
            if self.token_map is None:
                return tokens, probs
            full = probs.new_zeros((*probs.shape[:-1], self.config.vocab_size))
            return self.token_map[tokens], full.index_copy_(-1, self.token_map, probs)

        tokens, probs = self.propose_chain(ctx, k, pick)
        return Proposal(tokens=tokens, probs=probs)

    def _as_param_dtype(self, x: torch.Tensor) -> torch.Tensor:
        p = next(self.parameters())
        return x.to(device=p.device, dtype=p.dtype)

    # ----- starting from the target (lkspec.drafts.target_init) -------------------------------
    def init_from_target(self, tensors: TargetTensors, docs: Callable[[], Iterable[Any]]) -> Any:
        """Copy the target's token tables into this draft and fit its state maps on `docs()` (may be
        called more than once: each call yields the training documents again)."""
        raise LkspecError(f"{self.arch} has no target initialisation; use draft.init=random")

    def adopt_target(self, tensors: Callable[[], TargetTensors]) -> None:
        """Copy what this architecture always takes from the target (EAGLE-3: the frozen token embedding);
        `tensors` is called only by an architecture that needs them."""

    @classmethod
    def target_config_defaults(cls, target_config: Any) -> dict[str, Any]:
        """Config options taken from the target's HF config unless the user set them (EAGLE-3's layer shapes)."""
        return {}

    @classmethod
    def target_init_defaults(cls, hidden_size: int) -> dict[str, Any]:
        """Architecture options a target-initialised draft needs unless the user set them."""
        return {}

    def vocab_parameters(self) -> list[torch.nn.Parameter]:
        """What draft.freeze keeps fixed: the vocabulary-sized tensors (heads, token embeddings), and whatever else
        an architecture copies from or fits to the target (EAGLE-3's fc)."""
        return []

    # ----- the vLLM layout -------------------------------------------------------------------
    @abstractmethod
    def vllm_config(self) -> dict[str, Any]:
        """config.json keys in the layout vLLM's loader for this architecture reads."""

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Every stage's tensors under lkspec's names (tied weights appear once per stage): what a checkpoint
        in any layout is read into."""
        return dict(self.state_dict(keep_vars=False))

    def served_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the served layout under vLLM's names (the same as lkspec's unless an architecture
        stores something differently there, e.g. EAGLE-3's d2t/t2d for the token map)."""
        return self.export_state_dict()

    # ----- checkpoints -----------------------------------------------------------------------
    def save(self, path: str | Path, *, target: TargetIdentity | None = None,
             extra: dict[str, Any] | None = None, dtype: torch.dtype | None = None) -> Path:
        """Write config.json + model.safetensors (atomically, each file) into `path`.

        Tied tensors are stored once (aliases in the file's metadata): a tied 1152-wide draft over a 49k
        vocabulary is 0.25 GB instead of 1.5. `lkspec export` writes every stage for vLLM instead.
        """
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        moved: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}  # tied tensors stay one tensor on the CPU
        tensors = {}
        for k, v in self.state_dict().items():
            key = (v.data_ptr(), tuple(v.shape))
            if key not in moved:
                moved[key] = (v.to(dtype) if dtype is not None and v.is_floating_point() else v).cpu()
            tensors[k] = moved[key]
        for name, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise LkspecError(f"draft tensor {name} has non-finite values; refusing to save a broken draft")
        save_tensors(out / WEIGHTS_FILE, tensors, metadata={"format": "pt"}, dedupe=True)
        cfg = self.vllm_config()
        cfg["torch_dtype"] = str(dtype or next(self.parameters()).dtype).removeprefix("torch.")
        cfg["lkspec"] = {
            "version": __version__,
            "arch": self.arch,
            "config": self.config.model_dump(),
            "target": target.model_dump() if target is not None else None,
            **(extra or {}),
        }
        write_json(out / CONFIG_FILE, cfg)
        return out


DRAFTS: dict[str, type[Draft]] = {}


def register(cls: type[Draft]) -> type[Draft]:
    """Class decorator: make an architecture available by its `arch` name."""
    DRAFTS[cls.arch] = cls
    return cls


def draft_class(arch: str) -> type[Draft]:
    try:
        return DRAFTS[arch]
    except KeyError:
        raise LkspecError(f"unknown draft architecture {arch!r}; choose one of {sorted(DRAFTS)}") from None


def build_draft(arch: str, *, seed: int | None = None, **config: Any) -> Draft:
    """A randomly initialised draft of architecture `arch` (seeded, for reproducible runs)."""
    cls = draft_class(arch)
    cfg = parse(cls.config_cls, {"arch": arch, **config}, f"{arch} draft config")
    if seed is None:
        return cls(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg)


def check_draft_target(config: DraftConfig, identity: TargetIdentity, what: str = "the draft") -> None:
    """A one-line error when a draft's shapes cannot work with this target."""
    if config.vocab_size != identity.vocab_size or config.hidden_size != identity.hidden_size:
        raise LkspecError(
            f"{what} has vocab {config.vocab_size} / hidden {config.hidden_size} but target {identity.name!r} "
            f"has vocab {identity.vocab_size} / hidden {identity.hidden_size}; use a draft trained for this target"
        )
