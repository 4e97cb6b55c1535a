"""The triton attention backend (`--attention-backend triton`, vLLM's TRITON_ATTN): the flex
backend, but steps with prompt chunks run one Triton kernel over the paged KV instead of
FlexAttention's packed layout.

The flex backend's packed layout builds its block mask on the host every step (the distinct
KV blocks of each 16-token query block, attention/flex.py `_mixed_kv_blocks`) and runs
FlexAttention's sparse kernel over the cache's physical order. The batch-invariant mode's
kernel (attention/paged_invariant.py: a program per query tile of one request and KV head,
walking that request's KV through the block table in logical order, causal, up to the tile's
last position) needs no host work beyond the step's query starts, and its prefill measured
faster than the packed layout even at the mode's 16-row tiles (docs/benchmarks.md,
nineteenth session). Here it runs at prefill tiles: `PREFILL_ROWS` query rows (tokens x the
GQA group) and `PREFILL_TILE` KV tokens a step, one pass over the KV (no split fold); the
time to first token against flex's is in docs/benchmarks.md (twenty-first session). Decode
and verify steps (the decode layout) keep the flex backend's paged decode kernel, and a CPU,
or a head size outside 16-256 (smaller ones are not yet checked on a GPU), the flex
backend's paths entirely. It is the default backend.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fullgraph.attention import paged_invariant
from fullgraph.attention.backend import KVCache
from fullgraph.attention.flex import FlexAttentionBackend
from fullgraph.attention.metadata import AttentionSpec, PersistentInputs, StepAttentionInputs
from fullgraph.layers.policy import DEFAULT_POLICY, KernelPolicy

PREFILL_ROWS = 64      # query rows a program: tokens x the GQA group
PREFILL_TILE = 64      # KV tokens an online-softmax step
PREFILL_WARPS = 4      # up to head dim 128 (the fastest at 16 x 512 and 1 x 4,096 tokens)
PREFILL_WARPS_WIDE = 8  # above: 4 warps hold a 64 x 256 float32 accumulator in 128 threads
PREFILL_SPLIT = 0      # no splits: one pass over the KV
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256   # head sizes run on the GPU at these tiles; others: flex


def prefill_warps(head_dim: int) -> int:
    """Warps of the prefill tiles at this head dim (docs/benchmarks.md, twenty-ninth
    session: 4 warps spill at head dim 256, compiled for sm_90)."""
    return PREFILL_WARPS if head_dim <= 128 else PREFILL_WARPS_WIDE


@dataclass(slots=True)
class TiledMetadata:
    """A step with prompt chunks: its inputs, and the query tiles `update` lists on the
    device (`paged_invariant.tile_map`)."""
    inputs: StepAttentionInputs
    tiles: tuple[torch.Tensor, ...] | None = None


class TritonAttentionBackend(FlexAttentionBackend):
    name = "triton"

    def __init__(self, spec: AttentionSpec, device: torch.device, buffers: PersistentInputs,
                 compile: bool = False, policy: KernelPolicy = DEFAULT_POLICY) -> None:
        super().__init__(spec, device, buffers, compile, policy)
        d = spec.head_dim
        self.tiled = (device.type == "cuda" and paged_invariant.triton is not None
                      and MIN_HEAD_DIM <= d <= MAX_HEAD_DIM and d & (d - 1) == 0)
        self.query_tokens = max(1, PREFILL_ROWS // (spec.num_heads // spec.num_kv_heads))

    def metadata_key(self) -> tuple:
        return super().metadata_key() + (self.tiled,)

    def _tiled_layout(self, inputs: StepAttentionInputs) -> bool:
        return self.tiled and not self._decode_layout(inputs)

    def prepare(self, inputs: StepAttentionInputs) -> None:
        if not self._tiled_layout(inputs):
            super().prepare(inputs)

    def build(self, inputs: StepAttentionInputs):
        if self._tiled_layout(inputs):
            return TiledMetadata(inputs)
        return super().build(inputs)

    def update(self, metadata, inputs: StepAttentionInputs) -> None:
        if isinstance(metadata, TiledMetadata):
            metadata.tiles = paged_invariant.tile_map(
                inputs.query_start_loc, inputs.num_reqs_padded, inputs.num_tokens_padded,
                self.query_tokens)
            return
        super().update(metadata, inputs)

    def forward(self, q: torch.Tensor, kv_cache: KVCache, metadata) -> torch.Tensor:
        if isinstance(metadata, TiledMetadata):
            inputs = metadata.inputs
            return paged_invariant.tiled_attention(
                q, kv_cache[0], kv_cache[1], inputs.block_table, inputs.seq_lens,
                inputs.positions, metadata.tiles, self.spec.block_size, self.spec.scale,
                self.query_tokens, PREFILL_TILE, PREFILL_SPLIT, prefill_warps(self.spec.head_dim))
        return super().forward(q, kv_cache, metadata)
