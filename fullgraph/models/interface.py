"""What a model declares to the engine: the caches its layers need and what it supports.

The runner, the memory profiler and graph capture work from these declarations alone; they
never ask which architecture they run. Two cache kinds exist:

* paged KV (`PagedAttentionSpec`): full-attention layers. Every such layer has its own K and
  V tensors, but they share one block table: a request's block `i` holds the same token
  positions in every layer, so the block pool and prefix cache are per model, not per layer.
* state slots (`StateSpec`): linear-attention layers (Gated DeltaNet) keep a fixed-size
  state per request (a short-convolution window and a recurrent matrix) instead of a KV
  history. Each such layer has a pool of `max_num_seqs + 1` slots; a request holds one slot
  index for all layers while it runs, and slot 0 is the null slot that padding lanes use.

A model module exposes a class with `cache_specs(hf_config)`, the `capabilities` below,
`forward(input_ids, positions, ctx)`, `compute_logits(hidden, out)` and `load_weights`, and
optionally `check_config(hf_config, raw_config_dict)` (a ValueError naming a field it cannot run with, raised
when the engine reads the config). Adding one is that module plus a line in registry.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch


@dataclass(frozen=True, slots=True)
class PagedAttentionSpec:
    num_layers: int
    num_heads: int            # query heads
    num_kv_heads: int
    head_dim: int

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * dtype.itemsize


@dataclass(frozen=True, slots=True)
class StateTensorSpec:
    name: str
    shape: tuple[int, ...]    # per slot
    dtype: torch.dtype | None = None   # None: the model's dtype


@dataclass(frozen=True, slots=True)
class StateSpec:
    num_layers: int
    tensors: tuple[StateTensorSpec, ...]

    def bytes_per_slot(self, model_dtype: torch.dtype) -> int:
        per_layer = sum(torch.Size(t.shape).numel() * (t.dtype or model_dtype).itemsize
                        for t in self.tensors)
        return self.num_layers * per_layer


@dataclass(frozen=True, slots=True)
class CacheSpecs:
    attention: PagedAttentionSpec
    state: StateSpec | None = None


@dataclass(frozen=True, slots=True)
class ModelCapabilities:
    # A prefix-cache hit skips computing the prefix; a model with per-request recurrent state
    # would then start from an empty state, so such models turn prefix caching off.
    prefix_caching: bool = True


class Model(Protocol):
    capabilities: ClassVar[ModelCapabilities]

    @staticmethod
    def cache_specs(hf_config) -> CacheSpecs: ...

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor: ...

    def load_weights(self, weights) -> None: ...
