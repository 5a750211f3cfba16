"""Data parallelism under `torchrun`: process group, collectives, gradient sync, FSDP wrapping.

`ddp` replicates the draft and sums gradients across ranks once per step (one flattened all-reduce per
bucket). It is the same arithmetic as `DistributedDataParallel`, done by hand because the trainer runs
K + 1 backward passes per micro-batch (one per head, then the shared trunk) to keep a single
[tokens, V] logits tensor alive, and DDP's reducer expects one backward per forward.

`fsdp` shards every parameter with FSDP2 (`fully_shard`): each head's vocabulary projection is its own
unit (so a head's weights are gathered only while that head runs) and the rest of the draft is the
root unit. FSDP averages gradients over ranks while every rank's loss is already its share of the
global mean (global token counts are the denominators), so under fsdp each rank's loss is multiplied
by the world size first (`fsdp_grad_scale`). (Setting FSDP's divide factor to 1 instead needs
ReduceOp.PREMUL_SUM, which gloo lacks.)

Single process: every collective is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lkspec.errors import LkspecError

BUCKET_ELEMENTS = 1 << 24


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 (immutable)
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls) -> DistContext:
        """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; start the process group (nccl on GPU, else gloo)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
        if world <= 1:
            return cls(device=device)
        owns = False
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
            owns = True
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, device=device,
                   owns_group=owns)

    # ----- collectives (no-ops in one process) ---------------------------------------------------
    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place all-reduce SUM of a tensor (moved to the collective's device and back)."""
        if self.active:
            buf = t.to(self._comm_device())
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            t.copy_(buf.to(t.device))
        return t

    def max_int(self, value: int) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def sync_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum gradients over ranks, in flattened buckets (the replicated `ddp` mode)."""
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        missing = [p for p in params if p.grad is None]
        for p in missing:  # a rank whose batch slice was empty still takes part
            p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        bucket: list[torch.Tensor] = []
        size = 0
        for g in [*grads, None]:  # type: ignore[list-item]
            if g is not None:
                bucket.append(g)
                size += g.numel()
            if bucket and (g is None or size >= BUCKET_ELEMENTS):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                self.sum_(flat)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset : offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, size = [], 0

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Make every rank start from rank 0's weights (init, --init-from and --resume all go through it)."""
        if not self.active:
            return
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                buf = t.detach().to(self._comm_device()).clone()
                dist.broadcast(buf, src=0)
                t.copy_(buf.to(t.device))

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def shard_draft(draft: torch.nn.Module, head_modules: list[torch.nn.Module], ctx: DistContext) -> None:
    """FSDP2: one unit per head projection, the root unit for the rest; `head_states` gathers the root."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if len({id(m.weight) for m in head_modules}) != len(head_modules):
        raise LkspecError("parallel=fsdp cannot shard heads that share weights (a tied MLP-Speculator, EAGLE-3's "
                          "one head); use parallel=ddp, or set draft.tie_weights=false for an MLP-Speculator")
    for m in head_modules:
        fully_shard(m)
    fully_shard(draft)
    register_fsdp_forward_method(draft, "head_states")
