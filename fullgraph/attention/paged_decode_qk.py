"""Paged decode attention that starts from the qkv projection: q/k RMSNorm, RoPE and the
K/V store of this step's tokens inside the attention kernel (Qwen3's pre-attention, which
otherwise is a kernel of its own: layers/qk_norm_rope.py).

A decode step of a Qwen3 layer was six kernels at batch 1, and every kernel boundary costs
~1.5-2 µs inside a graph even with PDL (layers/pdl.py); this removes one per layer. It also
moves work in front of the wait for the previous kernel: the block table, the lengths and
the first KV tile of each split hold only what earlier steps wrote (this step's tokens are
not read from the cache), so they load while the qkv projection finishes.

Same program grid, splits and split merge as attention/paged_decode.py. Program (r, h, s)
attends over the request's cached tokens (positions below `seq_len - query_len`) in the
split's tiles, the first of which it loads before the wait. One split per (r, h) — the one
that would take the next tile, so it has the fewest — also normalizes, rotates and stores
this step's K/V of KV head h and attends to them from registers (causally: query token t
sees new tokens 0..t).
"""
from __future__ import annotations

import torch

from fullgraph.attention import paged_decode as paged
from fullgraph.layers.launch import Launcher, next_power_of_2
from fullgraph.layers.pdl import pdl_enabled
from fullgraph.layers.qk_norm_rope import triton_supported

try:
    import triton
    import triton.language as tl

    from fullgraph.layers.qk_norm_rope import norm_rope, rope_tables
except ImportError:            # CPU-only installs: the unfused path runs instead
    triton = None


if triton is not None:
    finish_split = paged.finish_split

    @triton.jit
    def _load_tile(k_ptr, v_ptr, bt_row, page, kv_pos, cached, h, stride_ks, stride_kh,
                   stride_vs, stride_vh, PAGE: tl.constexpr, D: tl.constexpr,
                   STEP: tl.constexpr):
        """The cached tokens among `kv_pos` (`page`: their block-table entries): which are
        inside, K as two halves and V; then the split's next tile (STEP tokens on) and its
        block-table entries, loaded one tile ahead."""
        HALF: tl.constexpr = D // 2
        dh = tl.arange(0, HALF)[None, :]
        inside = kv_pos < cached
        slot = page.to(tl.int64) * PAGE + kv_pos % PAGE
        k_rows = k_ptr + slot[:, None] * stride_ks + h * stride_kh
        k1 = tl.load(k_rows + dh, mask=inside[:, None], other=0.0)
        k2 = tl.load(k_rows + HALF + dh, mask=inside[:, None], other=0.0)
        v = tl.load(v_ptr + slot[:, None] * stride_vs + h * stride_vh
                    + tl.arange(0, D)[None, :], mask=inside[:, None], other=0.0)
        next_pos = kv_pos + STEP
        return inside, k1, k2, v, next_pos, tl.load(bt_row + next_pos // PAGE,
                                                    mask=next_pos < cached, other=0)

    @triton.jit
    def _attend_tile(q1, q2, k1, k2, v, inside, m_i, l_i, acc, scale_log2e):
        """Online-softmax update of (m_i, l_i, acc) with one KV tile, K given as halves."""
        qk = tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))
        qk = tl.where(inside[None, :], qk * scale_log2e, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows that saw nothing yet
        alpha = tl.exp2(m_i - m_use)
        pr = tl.exp2(qk - m_use[:, None])
        return (m_new, l_i * alpha + tl.sum(pr, 1),
                acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v))

    @triton.jit
    def _paged_decode_qk_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, slot_ptr,
                                k_ptr, v_ptr, out_ptr, block_table_ptr, seq_lens_ptr,
                                part_acc_ptr, part_ml_ptr, counter_ptr, scale_log2e, eps,
                                stride_qkv, stride_rope, stride_ks, stride_kh, stride_vs,
                                stride_vh, stride_bt, stride_ot, stride_oh,
                                QUERY_LEN: tl.constexpr, QLEN_P2: tl.constexpr,
                                GROUP: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr,
                                D: tl.constexpr, PAGE: tl.constexpr, TILE: tl.constexpr,
                                BLOCK_M: tl.constexpr, ROWS_P2: tl.constexpr,
                                NUM_SPLITS: tl.constexpr, CHUNK: tl.constexpr,
                                USE_PDL: tl.constexpr):
        r = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        ROWS: tl.constexpr = GROUP * QUERY_LEN
        HALF: tl.constexpr = D // 2
        dtype = k_ptr.dtype.element_ty
        m = tl.arange(0, BLOCK_M)
        t = m // GROUP                     # query token of the row
        head = h * GROUP + m % GROUP       # query head of the row
        live = m < ROWS
        tok = r.to(tl.int64) * QUERY_LEN + t
        dh = tl.arange(0, HALF)
        d = tl.arange(0, D)
        n = tl.arange(0, TILE)
        # --- Before the wait: parameters, the step's inputs (the input copy wrote them two or
        # more kernels back, layers/pdl.py) and the cache as earlier steps left it: the
        # split's first tile of cached tokens.
        seq_len = tl.load(seq_lens_ptr + r)
        cached = seq_len - QUERY_LEN       # tokens already in the cache
        n_tiles = tl.cdiv(cached, TILE)
        bt_row = block_table_ptr + r.to(tl.int64) * stride_bt
        kv_pos = s * TILE + n
        page = tl.load(bt_row + kv_pos // PAGE, mask=kv_pos < cached, other=0)
        inside, k1, k2, v, kv_pos, page = _load_tile(
            k_ptr, v_ptr, bt_row, page, kv_pos, cached, h, stride_ks, stride_kh, stride_vs,
            stride_vh, PAGE, D, NUM_SPLITS * TILE)
        # This step's tokens go to the split that would take the next tile: it has the
        # fewest cached tiles (none at all for short contexts with many splits).
        j = tl.arange(0, QLEN_P2)
        new_tok = r.to(tl.int64) * QUERY_LEN + j
        mine = s == n_tiles % NUM_SPLITS
        new = (j < QUERY_LEN) & (seq_len > 0) & mine     # batch-padding rows have none
        qw1 = tl.load(qw_ptr + dh)[None, :]
        qw2 = tl.load(qw_ptr + HALF + dh)[None, :]
        kw1 = tl.load(kw_ptr + dh)[None, :]
        kw2 = tl.load(kw_ptr + HALF + dh)[None, :]
        qc1, qc2, qs1, qs2 = rope_tables(tl.load(pos_ptr + tok, mask=live, other=0)[:, None],
                                         cos_ptr, sin_ptr, stride_rope, D, dtype)
        kc1, kc2, ks1, ks2 = rope_tables(tl.load(pos_ptr + new_tok, mask=new, other=0)[:, None],
                                         cos_ptr, sin_ptr, stride_rope, D, dtype)
        new_slot = tl.load(slot_ptr + new_tok, mask=new, other=0)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        # --- The qkv projection's rows: q of the rows; this step's k and v.
        src = qkv_ptr + tok[:, None] * stride_qkv + head[:, None] * D + dh[None, :]
        x1 = tl.load(src, mask=live[:, None], other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=live[:, None], other=0.0).to(tl.float32)
        new_row = qkv_ptr + new_tok[:, None] * stride_qkv
        kx1 = tl.load(new_row + (HQ + h) * D + dh[None, :], mask=new[:, None], other=0.0
                      ).to(tl.float32)
        kx2 = tl.load(new_row + (HQ + h) * D + HALF + dh[None, :], mask=new[:, None],
                      other=0.0).to(tl.float32)
        vn = tl.load(new_row + (HQ + HKV + h) * D + d[None, :], mask=new[:, None], other=0.0)
        q1, q2 = norm_rope(x1, x2, qw1, qw2, qc1, qc2, qs1, qs2, eps, D, dtype)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        m_i, l_i, acc = _attend_tile(q1, q2, k1, k2, v, inside, m_i, l_i, acc, scale_log2e)
        if mine:
            kn1, kn2 = norm_rope(kx1, kx2, kw1, kw2, kc1, kc2, ks1, ks2, eps, D, dtype)
            k_dst = k_ptr + new_slot[:, None] * stride_ks + h * stride_kh + dh[None, :]
            tl.store(k_dst, kn1, mask=new[:, None])
            tl.store(k_dst + HALF, kn2, mask=new[:, None])
            tl.store(v_ptr + new_slot[:, None] * stride_vs + h * stride_vh + d[None, :], vn,
                     mask=new[:, None])
            # too few new tokens for tl.dot: one at a time, as vectors
            for jj in tl.static_range(QUERY_LEN):
                pick = (j == jj)[:, None]
                k1j = tl.sum(tl.where(pick, kn1.to(tl.float32), 0.0), 0)
                k2j = tl.sum(tl.where(pick, kn2.to(tl.float32), 0.0), 0)
                vj = tl.sum(tl.where(pick, vn.to(tl.float32), 0.0), 0)
                sc = (tl.sum(q1.to(tl.float32) * k1j[None, :], 1)
                      + tl.sum(q2.to(tl.float32) * k2j[None, :], 1))
                sc = tl.where((t >= jj) & (seq_len > 0), sc * scale_log2e, float("-inf"))
                m_new = tl.maximum(m_i, sc)
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_use)
                pr = tl.exp2(sc - m_use)
                l_i = l_i * alpha + pr
                acc = acc * alpha[:, None] + pr[:, None] * vj[None, :]
                m_i = m_new
        # The split's other tiles, loaded in the loop (as in paged_decode.py, which Triton
        # pipelines; the page is loaded one tile ahead).
        for _ in range(s + NUM_SPLITS, n_tiles, NUM_SPLITS):
            inside, k1, k2, v, kv_pos, page = _load_tile(
                k_ptr, v_ptr, bt_row, page, kv_pos, cached, h, stride_ks, stride_kh,
                stride_vs, stride_vh, PAGE, D, NUM_SPLITS * TILE)
            m_i, l_i, acc = _attend_tile(q1, q2, k1, k2, v, inside, m_i, l_i, acc, scale_log2e)
        finish_split(acc, m_i, l_i, out_ptr, part_acc_ptr, part_ml_ptr, counter_ptr, tok, head,
                     r, h, s, stride_ot, stride_oh, QUERY_LEN, GROUP, HKV, D, BLOCK_M, ROWS_P2,
                     NUM_SPLITS, CHUNK)

    _paged_decode_qk_launcher = Launcher(_paged_decode_qk_kernel)


def supported(qkv: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """bf16/fp16 on CUDA (float32 models keep the unfused path's IEEE dots)."""
    return (qkv.dtype in (torch.bfloat16, torch.float16)
            and triton_supported(qkv, k_cache, k_cache.shape[-1]))


def paged_decode_qk(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                    eps: float, num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, block_size: int, query_len: int, num_splits: int,
                    scale: float, workspace: paged.PagedDecodeWorkspace) -> torch.Tensor:
    """qkv: [R * query_len, (Hq + 2 Hkv) * D] (request-major) -> attention output
    [R * query_len, Hq, D]; this step's K/V (normalized, rotated k) stored at
    `slot_mapping`. Tables and lengths as in `paged_decode`."""
    t = qkv.shape[0]
    hkv, d = k_cache.shape[1], k_cache.shape[2]
    rows, rows_p2 = paged.check_launch(t, num_heads, hkv, query_len, num_splits, workspace)
    out = torch.empty(t, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    pdl = pdl_enabled(qkv)
    _paged_decode_qk_launcher[(rows, hkv, num_splits)](
        qkv, positions, cos, sin, q_weight, k_weight, slot_mapping, k_cache, v_cache, out,
        block_table, seq_lens, workspace.acc, workspace.ml, workspace.counters,
        scale * 1.4426950408889634, eps, qkv.stride(0), cos.stride(0), k_cache.stride(0),
        k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), block_table.stride(0),
        out.stride(0), out.stride(1),
        QUERY_LEN=query_len, QLEN_P2=max(2, next_power_of_2(query_len)), GROUP=num_heads // hkv,
        HQ=num_heads, HKV=hkv, D=d, PAGE=block_size,
        **paged.tiling(block_size, rows_p2, num_splits), USE_PDL=pdl,
        num_warps=paged.NUM_WARPS, launch_pdl=pdl)
    return out
