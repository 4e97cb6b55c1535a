"""The elementwise steps around attention in Qwen3.5 / Qwen3-Next's gated attention layers, as
two Triton kernels (CUDA); models/qwen3_next.py keeps the torch ops they replace as the
reference and the path everywhere else.

- `qk_norm_rope_store_kv`: from the qkv projection (per q head a query and an output gate,
  then k and v heads), the zero-centered RMSNorm of every q and k head, rotary embedding of
  their first `rotary_dim` dimensions, and the K/V store at the step's slot mapping; returns
  q. One program per (token, head); the rotary partner of each element is read again from
  the input rather than moved between registers.
- `sigmoid_gate`: attention's output times sigmoid(gate), the input of o_proj.

The roundings of the torch ops: statistics and the (1 + weight) scale in float32, the norm's
output in the activations' dtype, the cos/sin tables rounded to it (as transformers does),
the rotation itself in float32 then rounded once (layers/qk_norm_rope.py's choice).
"""
from __future__ import annotations

import torch

from fullgraph.layers.launch import Launcher
from fullgraph.layers.pdl import pdl_enabled

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: the model's torch ops
    triton = None


def supported(qkv: torch.Tensor, k_cache: torch.Tensor, head_dim: int) -> bool:
    return (triton is not None and qkv.is_cuda and qkv.stride(-1) == 1
            and head_dim & (head_dim - 1) == 0 and k_cache.stride(-1) == 1
            and qkv.dtype == k_cache.dtype)


if triton is not None:
    @triton.jit
    def _qk_norm_rope_kv_kernel(qkv_ptr, stride_qkv, pos_ptr, cos_ptr, sin_ptr, stride_rope,
                                qw_ptr, kw_ptr, slot_ptr, q_ptr, stride_q, k_cache_ptr,
                                v_cache_ptr, stride_ks, stride_kh, stride_vs, stride_vh, eps,
                                HQ, HKV, D: tl.constexpr, ROT: tl.constexpr,
                                USE_PDL: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        dtype = q_ptr.dtype.element_ty
        d = tl.arange(0, D)
        rot = d < ROT
        half: tl.constexpr = ROT // 2
        partner = tl.where(d < half, d + half, d - half)
        is_q = h < HQ
        row = qkv_ptr + t * stride_qkv
        if is_q:
            src = row + h * 2 * D                    # [query | gate] per q head
            w_ptr = qw_ptr
        else:
            src = row + HQ * 2 * D + (h - HQ) * D
            w_ptr = kw_ptr
        w = tl.load(w_ptr + d).to(tl.float32)
        w_p = tl.load(w_ptr + partner, mask=rot, other=0.0).to(tl.float32)
        pos = tl.load(pos_ptr + t)
        c = tl.load(cos_ptr + pos * stride_rope + d, mask=rot, other=0.0).to(dtype).to(tl.float32)
        s = tl.load(sin_ptr + pos * stride_rope + d, mask=rot, other=0.0).to(dtype).to(tl.float32)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        x = tl.load(src + d).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, 0) / D + eps)
        y = (x * rstd * w).to(dtype).to(tl.float32)
        x_p = tl.load(src + partner, mask=rot, other=0.0).to(tl.float32)
        y_p = (x_p * rstd * w_p).to(dtype).to(tl.float32)
        y_p = tl.where(d < half, -y_p, y_p)          # rotate_half
        out = tl.where(rot, y * c + y_p * s, y).to(dtype)
        if is_q:
            tl.store(q_ptr + t * stride_q + h * D + d, out)
        else:
            kv = h - HQ
            slot = tl.load(slot_ptr + t).to(tl.int64)
            tl.store(k_cache_ptr + slot * stride_ks + kv * stride_kh + d, out)
            v = tl.load(row + HQ * 2 * D + HKV * D + kv * D + d)
            tl.store(v_cache_ptr + slot * stride_vs + kv * stride_vh + d, v)

    _qk_norm_rope_kv_launcher = Launcher(_qk_norm_rope_kv_kernel)

    @triton.jit
    def _sigmoid_gate_kernel(o_ptr, stride_o, qkv_ptr, stride_qkv, out_ptr, stride_out,
                             D: tl.constexpr, USE_PDL: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        d = tl.arange(0, D)
        dtype = out_ptr.dtype.element_ty
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        o = tl.load(o_ptr + t * stride_o + h * D + d).to(tl.float32)
        g = tl.load(qkv_ptr + t * stride_qkv + h * 2 * D + D + d).to(tl.float32)
        gate = tl.sigmoid(g).to(dtype).to(tl.float32)
        tl.store(out_ptr + t * stride_out + h * D + d, (o * gate).to(dtype))

    _sigmoid_gate_launcher = Launcher(_sigmoid_gate_kernel)


def qk_norm_rope_store_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                          eps: float, num_heads: int, num_kv_heads: int, rotary_dim: int,
                          k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> torch.Tensor:
    """qkv `[T, (2 Hq + 2 Hkv) * D]` -> q `[T, Hq, D]`; k and v stored at `slot_mapping` in
    the caches (`[slots, Hkv, D]` each). q_weight, k_weight: the norms' float32 1 + weight
    (layers/norm.py `kernel_weight`); cos/sin `[max_position, rotary_dim]`."""
    t, d = qkv.shape[0], k_cache.shape[-1]
    q = torch.empty(t, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    if t:
        pdl = pdl_enabled(qkv)
        _qk_norm_rope_kv_launcher[(t, num_heads + num_kv_heads)](
            qkv, qkv.stride(0), positions, cos, sin, cos.stride(0), q_weight, k_weight,
            slot_mapping, q, q.stride(0), k_cache, v_cache, k_cache.stride(0),
            k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), eps, num_heads,
            num_kv_heads, D=d, ROT=rotary_dim, USE_PDL=pdl, num_warps=2, launch_pdl=pdl)
    return q


def sigmoid_gate(o: torch.Tensor, qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """o `[T, Hq, D]` (attention's output) times sigmoid of the gates in qkv: `[T, Hq * D]`."""
    t, _, d = o.shape
    o = o.reshape(t, num_heads * d)
    out = torch.empty_like(o)
    if t:
        pdl = pdl_enabled(o)
        _sigmoid_gate_launcher[(t, num_heads)](o, o.stride(0), qkv, qkv.stride(0), out,
                                               out.stride(0), D=d, USE_PDL=pdl, num_warps=2,
                                               launch_pdl=pdl)
    return out
