"""Per-head q/k RMSNorm + RoPE + the KV-cache store of one step, as one kernel.

After the qkv projection a Qwen3 layer normalizes every q and k head, rotates them and stores
k and v in their cache slots. Compiled by inductor this was 4 kernels per layer (q's norm and
rotary, k's, the K store recomputing k's statistics per element, the V store): 6.6 µs per
layer of a batch-1 step on an H100 and 11 µs at batch 32; this kernel takes ~3 µs. A program
loads a [heads, head_dim / 2] tile per rotary half: all of a token's heads for big steps,
one head for decode-sized ones (so a token's heads spread over SMs).

`qk_norm_rope_store_kv` is an opaque custom op mutating the two cache tensors in place (as
`index_copy_` did); `ForwardContext.attention_qkv` calls it before attention unless the
backend does this step inside its attention kernel (decode, attention/paged_decode_qk.py,
which shares `norm_rope`). Anything the Triton kernel does not cover (CPU,
non-power-of-two head_dim) runs the reference below, the same functions the unfused model
used.
"""
from __future__ import annotations

import torch

from fullgraph.layers.norm import rms_norm
from fullgraph.layers.opaque import opaque_op
from fullgraph.layers.launch import Launcher, cdiv, next_power_of_2
from fullgraph.layers.pdl import pdl_enabled
from fullgraph.layers.rotary import apply_rotary

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: the reference path
    triton = None


if triton is not None:
    @triton.jit
    def rope_tables(pos, cos_ptr, sin_ptr, stride_rope, D: tl.constexpr, DTYPE: tl.constexpr):
        """cos/sin halves at positions `pos` ([heads, 1] or a scalar), rounded to the model
        dtype as transformers does, in float32: (c1, c2, s1, s2), each [heads, D / 2]."""
        HALF: tl.constexpr = D // 2
        rope = pos * stride_rope + tl.arange(0, HALF)[None, :]
        c1 = tl.load(cos_ptr + rope).to(DTYPE).to(tl.float32)
        c2 = tl.load(cos_ptr + rope + HALF).to(DTYPE).to(tl.float32)
        s1 = tl.load(sin_ptr + rope).to(DTYPE).to(tl.float32)
        s2 = tl.load(sin_ptr + rope + HALF).to(DTYPE).to(tl.float32)
        return c1, c2, s1, s2

    @triton.jit
    def rope(y1, y2, c1, c2, s1, s2, DTYPE: tl.constexpr):
        """Rotary of heads given as their float32 halves; the rotated halves in DTYPE."""
        return (y1 * c1 - y2 * s1).to(DTYPE), (y2 * c2 + y1 * s2).to(DTYPE)

    @triton.jit
    def norm_rope(x1, x2, w1, w2, c1, c2, s1, s2, eps, D: tl.constexpr, DTYPE: tl.constexpr):
        """RMSNorm (weight halves w1, w2) then rotary (`rope_tables`) of heads given as their
        two halves x1, x2 ([heads, D / 2] float32); returns the rotated halves in DTYPE. With
        rms_norm's roundings: statistics in float32, weight applied in the model dtype.
        Shared by this op and the fused decode attention (attention/paged_decode_qk.py), so
        both store the same K."""
        r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D + eps)[:, None]
        y1 = (w1 * (x1 * r).to(DTYPE)).to(tl.float32)
        y2 = (w2 * (x2 * r).to(DTYPE)).to(tl.float32)
        return rope(y1, y2, c1, c2, s1, s2, DTYPE)

    @triton.jit
    def _qk_norm_rope_kv_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, slot_ptr,
                                q_ptr, k_cache_ptr, v_cache_ptr, stride_qkv, stride_q,
                                stride_ks, stride_kh, stride_vs, stride_vh, stride_rope, eps,
                                HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                                HEADS: tl.constexpr, NORM: tl.constexpr,
                                EARLY_LAUNCH: tl.constexpr, USE_PDL: tl.constexpr):
        """Program (t, g): token t, heads [g * HEADS, (g + 1) * HEADS) of q's then k's; a k
        head's program also stores the v head of the same index. NORM false: rotary only
        (Llama layers; the weight pointers are not read)."""
        if USE_PDL and EARLY_LAUNCH:
            # decode attention may launch now: it loads nothing before its own wait, and
            # waiting on this kernel orders it after the qkv projection too
            tl.extra.cuda.gdc_launch_dependents()
        t = tl.program_id(0).to(tl.int64)
        HALF: tl.constexpr = D // 2
        dtype = q_ptr.dtype.element_ty
        h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)[:, None]
        d = tl.arange(0, HALF)[None, :]
        live = h < HQ + HKV
        is_q = h < HQ
        # Parameters and the step's inputs (positions, slots: the input copy wrote them two
        # or more kernels back, layers/pdl.py) load before waiting for the qkv projection.
        if NORM:
            w1 = tl.where(is_q, tl.load(qw_ptr + d), tl.load(kw_ptr + d))
            w2 = tl.where(is_q, tl.load(qw_ptr + HALF + d), tl.load(kw_ptr + HALF + d))
        c1, c2, s1, s2 = rope_tables(tl.load(pos_ptr + t), cos_ptr, sin_ptr, stride_rope, D,
                                     dtype)
        slot = tl.load(slot_ptr + t)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            if not EARLY_LAUNCH:
                tl.extra.cuda.gdc_launch_dependents()
        src = qkv_ptr + t * stride_qkv + h * D + d
        x1 = tl.load(src, mask=live, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=live, other=0.0).to(tl.float32)
        if NORM:
            o1, o2 = norm_rope(x1, x2, w1, w2, c1, c2, s1, s2, eps, D, dtype)
        else:
            o1, o2 = rope(x1, x2, c1, c2, s1, s2, dtype)
        dst_q = q_ptr + t * stride_q + h * D + d
        tl.store(dst_q, o1, mask=is_q)
        tl.store(dst_q + HALF, o2, mask=is_q)
        is_k = (h >= HQ) & live
        kv_head = h - HQ
        dst_k = k_cache_ptr + slot * stride_ks + kv_head * stride_kh + d
        tl.store(dst_k, o1, mask=is_k)
        tl.store(dst_k + HALF, o2, mask=is_k)
        src_v = qkv_ptr + t * stride_qkv + (HQ + HKV) * D + kv_head * D + d
        dst_v = v_cache_ptr + slot * stride_vs + kv_head * stride_vh + d
        tl.store(dst_v, tl.load(src_v, mask=is_k), mask=is_k)
        tl.store(dst_v + HALF, tl.load(src_v + HALF, mask=is_k), mask=is_k)

    _qk_norm_rope_kv_launcher = Launcher(_qk_norm_rope_kv_kernel)


# Few tokens (decode): one head per program, so the heads spread over SMs instead of one
# program doing all of a token's ~24 heads serially (3 µs at batch 1 on an H100).
FEW_TOKENS = 64
# Between 2 and FEW_TOKENS tokens the kernel lets the next one launch before waiting itself
# (EARLY_LAUNCH): faster at batch 32, slower at one token, no gain above FEW_TOKENS
# (docs/benchmarks.md, "Tuning figures from code comments"). Batches of 2-16 use the fused
# decode kernel.


def triton_supported(qkv: torch.Tensor, k_cache: torch.Tensor, head_dim: int) -> bool:
    """Whether the Triton kernel (and the fused decode kernel's prologue) covers these."""
    return (triton is not None and qkv.is_cuda and qkv.stride(-1) == 1
            and head_dim >= 32 and head_dim & (head_dim - 1) == 0
            and k_cache.stride(-1) == 1 and qkv.dtype == k_cache.dtype)


@opaque_op("fullgraph::qk_norm_rope_store_kv", mutates_args=("k_cache", "v_cache"))
def qk_norm_rope_store_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, q_weight: torch.Tensor | None,
                          k_weight: torch.Tensor | None,
                          eps: float, num_heads: int, num_kv_heads: int,
                          k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, batch_invariant: bool = False
                          ) -> torch.Tensor:
    """qkv: [T, (Hq + 2 Hkv) * D] -> q [T, Hq, D] normalized and rotated; k (normalized,
    rotated) and v stored at `slot_mapping` in the caches ([slots, Hkv, D] each). Weights
    None: no q/k norm, rotary only (a Llama layer: the EAGLE drafters).
    `batch_invariant` (the mode, layers/policy.py): one head per program at every token
    count, where the normal mode reduces a head's squares in another layout above
    FEW_TOKENS."""
    t = qkv.shape[0]
    d = k_cache.shape[-1]
    if not triton_supported(qkv, k_cache, d):
        q, k, v = qkv.split((num_heads * d, num_kv_heads * d, num_kv_heads * d), dim=-1)
        q, k = q.reshape(t, num_heads, d), k.reshape(t, num_kv_heads, d)
        if q_weight is not None:
            q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
        q, k = apply_rotary(positions, cos, sin, q, k)
        k_cache.index_copy_(0, slot_mapping, k)
        v_cache.index_copy_(0, slot_mapping, v.reshape(t, num_kv_heads, d))
        return q
    q = torch.empty(t, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    heads = num_heads + num_kv_heads
    per_program = 1 if t <= FEW_TOKENS or batch_invariant else next_power_of_2(heads)
    if t:
        pdl = pdl_enabled(qkv)
        norm = q_weight is not None
        _qk_norm_rope_kv_launcher[(t, cdiv(heads, per_program))](
            qkv, positions, cos, sin, q_weight if norm else qkv, k_weight if norm else qkv,
            slot_mapping, q, k_cache, v_cache,
            qkv.stride(0), q.stride(0), k_cache.stride(0), k_cache.stride(1),
            v_cache.stride(0), v_cache.stride(1), cos.stride(0), eps,
            HQ=num_heads, HKV=num_kv_heads, D=d, HEADS=per_program, NORM=norm,
            EARLY_LAUNCH=1 < t <= FEW_TOKENS, USE_PDL=pdl,
            num_warps=1 if per_program == 1 else 4, launch_pdl=pdl)
    return q


@qk_norm_rope_store_kv.register_fake
def _(qkv, positions, cos, sin, q_weight, k_weight, eps, num_heads, num_kv_heads,
      k_cache, v_cache, slot_mapping, batch_invariant=False):
    return qkv.new_empty(qkv.shape[0], num_heads, k_cache.shape[-1])
