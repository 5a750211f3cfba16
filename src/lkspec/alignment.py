"""Which target distribution and which mask belong to draft head k at anchor t (DESIGN §1).

Head k (1-based) at anchor t predicts token t+k+1 from h_t (and, for MLP-Speculator, tokens
t+1..t+k). Its teacher is the target's next-token distribution at position t+k. A pair counts only if
the predicted token is a response token (`loss_mask`) and, in packed batches, belongs to the same
document as the anchor (`doc_ids`; documents are contiguous, so equal ends mean no boundary between).
"""

from __future__ import annotations

import torch


def head_targets(target_logits: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T, V] target logits -> the [B, T-k, V] rows that head k is trained against."""
    return target_logits[:, k:]


def head_mask(loss_mask: torch.Tensor, k: int, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [B, T-k]: anchor t of head k counts iff token t+k+1 exists, is trained on, and is in t's document."""
    B, T = loss_mask.shape
    n = max(T - k, 0)
    mask = torch.zeros(B, n, dtype=torch.bool, device=loss_mask.device)
    m = max(T - k - 1, 0)
    mask[:, :m] = loss_mask[:, k + 1 : k + 1 + m].bool()
    if doc_ids is not None:
        mask[:, :m] &= doc_ids[:, :m] == doc_ids[:, k + 1 : k + 1 + m]
    return mask


def head_masks(loss_mask: torch.Tensor, num_heads: int, doc_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
    return [head_mask(loss_mask, k, doc_ids) for k in range(1, num_heads + 1)]
