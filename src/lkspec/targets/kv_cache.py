"""The target's KV cache for lkspec's decoding loops: HF's `DynamicCache`, with keys and values kept in buffers that
have room to grow.

HF's dynamic layer appends a token by `torch.cat` of the whole cache, so every decoding step copies every layer's
keys and values: 15 % of a regeneration step on the 2-core CPU (SmolLM2-135M, batch 32, ~300-token rows). Here a
layer writes the new positions into a buffer allocated once for the expected length (doubled if a caller goes past
it) and returns a view of the filled part, so a step copies only what it adds. Cropping (the generator rolls the
cache back to the accepted prefix) shortens the view; the next update overwrites the rejected positions.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


def new_cache(config: Any, capacity: int = 0) -> Any:
    """A `DynamicCache` for a model with this config whose full-attention layers preallocate `capacity` positions
    (0: grow from the first update's length). Layers of other kinds (sliding windows) stay HF's."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    layer_cls, hf_layer = _growing_layer()
    layers = getattr(cache, "layers", None)
    if layer_cls is not None and layers:
        cache.layers = [layer_cls(capacity) if type(layer) is hf_layer else layer for layer in layers]
    return cache


@functools.cache
def _growing_layer() -> tuple[type | None, type | None]:
    """HF's `DynamicLayer` with buffers, and HF's class it replaces; (None, None) where this transformers' layers do
    not work as assumed (built once: transformers is imported lazily)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # before 4.54 the cache is lists, without layer objects
        return None, None
    # 4.54-4.57 layers initialise differently (no `is_initialized`, lazy_initialization(key_states)): HF's own
    if "value_states" not in inspect.signature(DynamicLayer.lazy_initialization).parameters \
            or not hasattr(DynamicLayer(), "is_initialized"):
        return None, None
    base: Any = DynamicLayer

    class GrowingLayer(base):  # type: ignore[misc, valid-type]
        def __init__(self, capacity: int = 0) -> None:
            super().__init__()
            self.capacity = capacity
            self._k: torch.Tensor | None = None
            self._v: torch.Tensor | None = None

        def _owns(self) -> bool:
            """Whether keys are still a view of the buffer (a caller may have replaced them)."""
            return self._k is not None and self.keys.numel() > 0 and self.keys.data_ptr() == self._k.data_ptr() \
                and self.keys.shape[0] == self._k.shape[0]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = self.get_seq_length()
            m = n + key_states.shape[-2]
            k, v = self._k, self._v
            if k is None or v is None or (n and not self._owns()) or m > k.shape[-2] or k.shape[0] != len(key_states):
                if n and len(self.keys) != len(key_states):
                    raise ValueError(f"the cache holds {len(self.keys)} rows, the update {len(key_states)}")
                cap = max(m, self.capacity, 2 * n)
                k = key_states.new_empty((*key_states.shape[:-2], cap, key_states.shape[-1]))
                v = value_states.new_empty((*value_states.shape[:-2], cap, value_states.shape[-1]))
                if n:
                    k[..., :n, :] = self.keys
                    v[..., :n, :] = self.values
                self._k, self._v = k, v
            k[..., n:m, :] = key_states
            v[..., n:m, :] = value_states
            self.keys, self.values = k[..., :m, :], v[..., :m, :]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Rows leave the batch: their filled part moves to a smaller buffer of the same capacity."""
            n = self.get_seq_length()
            if n and self._owns() and self._k is not None and self._v is not None:
                k = self._k.new_empty((len(indices), *self._k.shape[1:]))
                v = self._v.new_empty((len(indices), *self._v.shape[1:]))
                k[..., :n, :] = self.keys[indices]
                v[..., :n, :] = self.values[indices]
                self._k, self._v = k, v
                self.keys, self.values = k[..., :n, :], v[..., :n, :]
            else:
                super().batch_select_indices(indices)

    return GrowingLayer, DynamicLayer
