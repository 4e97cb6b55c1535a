"""The attention-backend contract.

A backend owns its metadata buffers (persistent, sized at the configured maxima), fills them
from `StepAttentionInputs` in `build`, and computes attention over the paged KV cache in
`forward`. It knows no requests, scheduler or model.

KV cache layout, per layer: a `KVCache` pair of K and V tensors, each
`[num_blocks * block_size, num_kv_heads, head_dim]`; slot `s` lives in block
`s // block_size`. This step's K/V are stored at `ForwardContext.slot_mapping` *before*
attention reads the cache: `ForwardContext.attention_qkv` runs the layer's q/k prologue and
the store (layers/qk_norm_rope.py) and then `forward`, unless the backend's optional
`forward_qkv` does all three in one kernel (attention/paged_decode_qk.py). Padding lanes
write into the null block 0, which no real request ever reads. K and V of each layer are
separate tensors (no shared base), so the in-place store really is in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol

import torch

from fullgraph.attention.metadata import AttentionSpec, PersistentInputs, StepAttentionInputs
from fullgraph.layers.policy import DEFAULT_POLICY, KernelPolicy
from fullgraph.layers.qk_norm_rope import qk_norm_rope_store_kv

KVCache = tuple[torch.Tensor, torch.Tensor]   # one layer's (K, V), each [slots, Hkv, D]


@dataclass(frozen=True, slots=True)
class QKNormRope:
    """A layer's step between the qkv projection and attention: RMSNorm of every q and k
    head (Qwen3; weights None: none, as in Llama), then RoPE from the cos/sin tables
    ([max_position, D], float32)."""
    q_weight: torch.Tensor | None
    k_weight: torch.Tensor | None
    eps: float
    cos: torch.Tensor
    sin: torch.Tensor
    num_heads: int
    num_kv_heads: int


class AttentionBackend(Protocol):
    name: ClassVar[str]
    supports_cudagraph: ClassVar[bool]
    # whether its every token's result is independent of the rest of the step
    # (layers/policy.py); the engine refuses the batch-invariant mode with one that is not
    supports_batch_invariant: ClassVar[bool]

    def __init__(self, spec: AttentionSpec, device: torch.device, buffers: PersistentInputs,
                 compile: bool, policy: KernelPolicy) -> None: ...

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

    def metadata_key(self) -> tuple:
        """What this instance's metadata depends on besides the step's inputs: an instance
        whose key equals another's can run on metadata the other built for the same step (a
        drafter's graphed pass reads the target's). Equal keys mean the same class, and
        equal settings of every choice `build` makes from the spec (the head counts, and the
        head-size-dependent kernels: a layer of another head size may take another path)."""

    # Optional: `forward_qkv(qkv, positions, kv_cache, slot_mapping, prologue, metadata)`
    # does the prologue, the K/V store and attention in one go from the qkv projection
    # ([T, (Hq + 2 Hkv) * D]) and returns [T, Hq, D], or None where it does not apply
    # (then ForwardContext runs the two steps).


def get_backend_class(name: str, policy: KernelPolicy = DEFAULT_POLICY
                      ) -> type[AttentionBackend]:
    """The backend `--attention-backend` names, under the engine's kernel policy. In the
    batch-invariant mode the flex and triton backends resolve to the invariant path
    (attention/invariant.py: one arithmetic for prefill, mixed and decode rows); a backend
    without one is a ValueError."""
    if name == "flex":
        if policy.batch_invariant:
            from fullgraph.attention.invariant import InvariantAttentionBackend
            return InvariantAttentionBackend
        from fullgraph.attention.flex import FlexAttentionBackend
        return FlexAttentionBackend
    if name == "triton":
        if policy.batch_invariant:       # the same kernel family, at the mode's tiles
            from fullgraph.attention.invariant import InvariantAttentionBackend
            return InvariantAttentionBackend
        from fullgraph.attention.triton_attn import TritonAttentionBackend
        return TritonAttentionBackend
    if name == "sdpa":
        from fullgraph.attention.sdpa import SDPABackend
        policy.require("attention backend 'sdpa'", SDPABackend.supports_batch_invariant)
        return SDPABackend
    raise ValueError(f"unknown attention backend {name!r}: choose 'flex', 'triton' or 'sdpa'")


class ForwardContext:
    """The step state a model's forward needs: passed explicitly, never a module global.

    Its lifetime is one forward call (or, under a CUDA graph, the graph's: the metadata then
    lives in persistent buffers that replays refill). The model hands each of its layers that
    layer's own cache: `kv_caches[i]` to its i-th full-attention layer, `state_caches[j]` to
    its j-th linear-attention layer (models/interface.py says what each holds).
    """

    __slots__ = ("backend", "metadata", "kv_caches", "slot_mapping", "state_caches",
                 "state_metadata", "multimodal", "piecewise", "_forward_qkv")

    def __init__(self, backend: AttentionBackend, metadata: Any, kv_caches: list[KVCache],
                 slot_mapping: torch.Tensor, state_caches: list[tuple[torch.Tensor, ...]] = (),
                 state_metadata: Any = None, multimodal: Any = None,
                 piecewise: Callable[..., torch.Tensor] | None = None):
        self.backend = backend
        self.metadata = metadata
        self.kv_caches = kv_caches        # per full-attention layer
        self.slot_mapping = slot_mapping  # [num_tokens_padded]
        self.state_caches = state_caches  # per linear-attention layer: its state pools
        self.state_metadata = state_metadata   # attention/gdn.py's GDNMetadata, or None
        # multimodal models: multimodal/inputs.py's MultiModalStepInputs (rotary positions,
        # the step's image rows), else None
        self.multimodal = multimodal
        # PIECEWISE graphs: runs attention outside the graph pieces (the graph runtime's
        # `between_pieces`), reading `metadata` when it runs: the runner sets this step's
        # before each replay
        self.piecewise = piecewise
        self._forward_qkv = getattr(backend, "forward_qkv", None)

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache) -> None:
        """Write this step's K/V ([T, Hkv, D]) at the slot mapping: for a layer that runs its
        own q/k prologue, before `attention`."""
        kv_cache[0].index_copy_(0, self.slot_mapping, k.to(kv_cache[0].dtype))
        kv_cache[1].index_copy_(0, self.slot_mapping, v.to(kv_cache[1].dtype))

    # Compiled layers (`--compile-layers`) break their graph at these two: the backends'
    # kernels are ours or compiled separately, per shape bucket, and graph capture covers all.
    @torch.compiler.disable
    def attention(self, q: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        if self.piecewise is not None:
            return self.piecewise(lambda q: self.backend.forward(q, kv_cache, self.metadata), q)
        return self.backend.forward(q, kv_cache, self.metadata)

    @torch.compiler.disable
    def attention_qkv(self, qkv: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                      prologue: QKNormRope) -> torch.Tensor:
        """Attention from the qkv projection: the prologue and the K/V store, then attention
        (one kernel where the backend fuses them: decode steps of the flex backend on CUDA)."""
        if self.piecewise is not None:
            return self.piecewise(
                lambda qkv, positions: self._attention_qkv(qkv, positions, kv_cache, prologue),
                qkv, positions)
        return self._attention_qkv(qkv, positions, kv_cache, prologue)

    def _attention_qkv(self, qkv: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                       prologue: QKNormRope) -> torch.Tensor:
        if self._forward_qkv is not None:
            out = self._forward_qkv(qkv, positions, kv_cache, self.slot_mapping, prologue,
                                    self.metadata)
            if out is not None:
                return out
        p = prologue
        q = qk_norm_rope_store_kv(qkv, positions, p.cos, p.sin, p.q_weight, p.k_weight, p.eps,
                                  p.num_heads, p.num_kv_heads, kv_cache[0], kv_cache[1],
                                  self.slot_mapping)
        return self.backend.forward(q, kv_cache, self.metadata)
