"""The attention-backend contract.

A backend owns its metadata buffers (persistent, sized at the configured maxima), fills them
from `StepAttentionInputs` in `build`, and computes attention over the paged KV cache in
`forward`. It knows no requests, scheduler or model.

KV cache layout, per layer: `[2, num_blocks * block_size, num_kv_heads, head_dim]`
(K then V); slot `s` lives in block `s // block_size`. Writes go through the slot mapping,
padding lanes write into the null block 0, which no real request ever reads.
"""
from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch

from fullgraph.attention.metadata import AttentionSpec, PersistentInputs, StepAttentionInputs


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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, metadata: Any) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] for this step's tokens; returns [T, Hq, D]."""


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    kv_cache[0].index_copy_(0, slot_mapping, k)
    kv_cache[1].index_copy_(0, slot_mapping, v)


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

    __slots__ = ("backend", "metadata", "kv_caches")

    def __init__(self, backend: AttentionBackend, metadata: Any, kv_caches: list[torch.Tensor]):
        self.backend = backend
        self.metadata = metadata
        self.kv_caches = kv_caches

    # Compiled layers break their graph here: the attention backend is compiled separately,
    # per shape bucket, and graph capture covers both.
    @torch.compiler.disable
    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> torch.Tensor:
        return self.backend.forward(q, k, v, self.kv_caches[layer_idx], self.metadata)
