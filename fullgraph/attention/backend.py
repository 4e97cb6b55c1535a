"""The attention-backend contract.

A backend owns its metadata buffers (persistent, sized at the configured maxima), fills them
from `StepAttentionInputs` in `build`, and computes attention over the paged KV cache in
`forward`. It knows no requests, scheduler or model.

KV cache layout, per layer: a `KVCache` pair of K and V tensors, each
`[num_blocks * block_size, num_kv_heads, head_dim]`; slot `s` lives in block
`s // block_size`. The model stores this step's K/V at `ForwardContext.slot_mapping`
(`cache.index_copy_(0, slot_mapping, k)`) *before* attention, inside its layer —
Qwen3 in the kernel that also normalizes and rotates k (layers/qk_norm_rope.py); padding
lanes write into the null block 0, which no real request ever reads. Backends only read the
cache. K and V of each layer are separate tensors (no shared base), so the compiled layer's
in-place store really is in place.
"""
from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch

from fullgraph.attention.metadata import AttentionSpec, PersistentInputs, StepAttentionInputs

KVCache = tuple[torch.Tensor, torch.Tensor]   # one layer's (K, V), each [slots, Hkv, D]


class AttentionBackend(Protocol):
    name: ClassVar[str]
    supports_cudagraph: ClassVar[bool]

    def __init__(self, spec: AttentionSpec, device: torch.device, buffers: PersistentInputs,
                 compile: bool) -> None: ...

    def prepare(self, inputs: StepAttentionInputs) -> None:
        """Host-side work for this step: fill staging buffers from the CPU arrays and copy
        them into the persistent device buffers. Runs every step, never inside a graph."""

    def build(self, inputs: StepAttentionInputs) -> Any:
        """Make the metadata object for this step's (padded) shape, over persistent buffers.
        Eager steps build one per step; a captured graph keeps the one it was captured with
        (its attention state)."""

    def update(self, metadata: Any, inputs: StepAttentionInputs) -> None:
        """Device-side refresh of the metadata buffers from the step inputs; captured inside
        the graph, so it must not synchronize with the host or allocate persistent state."""

    def forward(self, q: torch.Tensor, kv_cache: KVCache, metadata: Any) -> torch.Tensor:
        """q: [T, Hq, D] for this step's tokens, whose K/V the cache already holds;
        returns [T, Hq, D]."""


def get_backend_class(name: str) -> type[AttentionBackend]:
    if name == "flex":
        from fullgraph.attention.flex import FlexAttentionBackend
        return FlexAttentionBackend
    if name == "sdpa":
        from fullgraph.attention.sdpa import SDPABackend
        return SDPABackend
    raise ValueError(f"unknown attention backend {name!r}: choose 'flex' or 'sdpa'")


class ForwardContext:
    """The step state a model's forward needs: passed explicitly, never a module global.

    Its lifetime is one forward call (or, under a CUDA graph, the graph's: the metadata then
    lives in persistent buffers that replays refill).
    """

    __slots__ = ("backend", "metadata", "kv_caches", "slot_mapping")

    def __init__(self, backend: AttentionBackend, metadata: Any, kv_caches: list[KVCache],
                 slot_mapping: torch.Tensor):
        self.backend = backend
        self.metadata = metadata
        self.kv_caches = kv_caches        # per layer; the model hands each layer its own
        self.slot_mapping = slot_mapping  # [num_tokens_padded]

    # Compiled layers break their graph here: the attention backend is compiled separately,
    # per shape bucket, and graph capture covers both.
    @torch.compiler.disable
    def attention(self, q: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        return self.backend.forward(q, kv_cache, self.metadata)
