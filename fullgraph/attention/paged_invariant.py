"""The batch-invariant mode's attention on the GPU: one Triton kernel for prefill, mixed and
decode steps, in which a token's result depends on its own q and its request's K/V only.

It computes what attention/invariant.py's `paged_attention` (the CPU reference) describes:

* a program takes one query tile (up to `query_tokens` consecutive tokens of one request,
  times the GROUP query heads of one KV head, GQA packing: `BLOCK_M` rows) and walks its
  request's KV in logical order through the block table, this step's K/V included (stored
  before the kernel runs, never taken from registers);
* KV positions are cut into splits of `attention_split` tokens at absolute positions; a
  split runs an online softmax over tiles of `attention_tile` tokens, in order, from an
  empty state (float32); the splits are folded into the result one at a time, in order;
* a row's scores are its own dot products, masked past its position, so the tile's other
  rows, padding rows, and the tiles and splits past the row's position change nothing: a
  masked tile leaves a row's state exactly as it was (its scale factor is set to 1, its
  probabilities are exp2(-inf) = 0). A decode row (a tile of its own) and the same row
  inside a prefill tile therefore run the same operations on the same values.

The tile shape is fixed (never chosen from the batch), so one compiled kernel serves every
step. The query tiles are listed on the device from `query_start_loc` (`tile_map`), to a
count fixed by the step's padded shape, so graphs capture it. Splits run serially within a
program: a decode step at batch 1 has only `num_kv_heads` programs (a parallel-split variant
with the same fold is possible, docs/batch_invariance.md, section 6.5).
"""
from __future__ import annotations

import torch

from fullgraph.layers.policy import KernelPolicy

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: attention/invariant.py's reference runs
    triton = None

MIN_ROWS = 16                  # tl.dot's smallest M
NUM_WARPS = 4


def pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def query_tokens(group: int) -> int:
    """Tokens per query tile: GQA groups packed to tl.dot's 16 rows."""
    return max(1, MIN_ROWS // group)


if triton is not None:
    @triton.jit
    def _kv_tile(q, pos, j0, seq_len, bt_row, k_ptr, v_ptr, h, stride_ks, stride_kh,
                 stride_vs, stride_vh, scale_log2e, m_i, l_i, acc, d, n,
                 PAGE: tl.constexpr, PRECISION: tl.constexpr):
        """One online-softmax step over the KV tile at logical positions j0 + n."""
        kv_pos = j0 + n
        inside = kv_pos < seq_len
        page = tl.load(bt_row + kv_pos // PAGE, mask=inside, other=0)
        slot = page.to(tl.int64) * PAGE + kv_pos % PAGE
        k = tl.load(k_ptr + slot[:, None] * stride_ks + h * stride_kh + d[None, :],
                    mask=inside[:, None], other=0.0)
        v = tl.load(v_ptr + slot[:, None] * stride_vs + h * stride_vh + d[None, :],
                    mask=inside[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e
        seen = (kv_pos[None, :] <= pos[:, None]) & inside[None, :]
        qk = tl.where(seen, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        # a row whose max did not move keeps its sums exactly (x * 1)
        alpha = tl.where(m_new == m_i, 1.0, tl.exp2(m_i - m_use))
        p = tl.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _invariant_attention_kernel(
            q_ptr, k_ptr, v_ptr, out_ptr, block_table_ptr, seq_lens_ptr, positions_ptr,
            tile_req_ptr, tile_first_ptr, tile_end_ptr, scale_log2e,
            stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_bt,
            stride_ot, stride_oh,
            GROUP: tl.constexpr, QTOK: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr,
            PAGE: tl.constexpr, TILE: tl.constexpr, SPLIT: tl.constexpr,
            PRECISION: tl.constexpr):
        """SPLIT 0: one pass over the KV, no split fold (one accumulator, not two)."""
        i = tl.program_id(0)
        h = tl.program_id(1)
        r = tl.load(tile_req_ptr + i)
        if r >= 0:
            first = tl.load(tile_first_ptr + i)
            end = tl.load(tile_end_ptr + i)
            m = tl.arange(0, BLOCK_M)
            tok = first + m // GROUP
            head = h * GROUP + m % GROUP
            live = (m < QTOK * GROUP) & (tok < end)
            tok = tok.to(tl.int64)
            d = tl.arange(0, D)
            n = tl.arange(0, TILE)
            q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh
                        + d[None, :], mask=live[:, None], other=0.0)
            pos = tl.load(positions_ptr + tok, mask=live, other=-1)
            seq_len = tl.load(seq_lens_ptr + r)
            last = tl.max(pos, 0)                       # the tile's furthest position
            bt_row = block_table_ptr + r.to(tl.int64) * stride_bt
            if SPLIT == 0:
                total_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
                total_l = tl.zeros([BLOCK_M], tl.float32)
                total_acc = tl.zeros([BLOCK_M, D], tl.float32)
                for j0 in range(0, last + 1, TILE):
                    total_m, total_l, total_acc = _kv_tile(
                        q, pos, j0, seq_len, bt_row, k_ptr, v_ptr, h, stride_ks, stride_kh,
                        stride_vs, stride_vh, scale_log2e, total_m, total_l, total_acc, d, n,
                        PAGE, PRECISION)
            else:
                total_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
                total_l = tl.zeros([BLOCK_M], tl.float32)
                total_acc = tl.zeros([BLOCK_M, D], tl.float32)
                for s0 in range(0, last + 1, SPLIT):
                    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
                    l_i = tl.zeros([BLOCK_M], tl.float32)
                    acc = tl.zeros([BLOCK_M, D], tl.float32)
                    for j0 in range(s0, tl.minimum(s0 + SPLIT, last + 1), TILE):
                        m_i, l_i, acc = _kv_tile(
                            q, pos, j0, seq_len, bt_row, k_ptr, v_ptr, h, stride_ks,
                            stride_kh, stride_vs, stride_vh, scale_log2e, m_i, l_i, acc, d, n,
                            PAGE, PRECISION)
                    # fold the split into the total, in split order
                    m_t = tl.maximum(total_m, m_i)
                    m_use = tl.where(m_t == float("-inf"), 0.0, m_t)
                    w_a = tl.where(m_t == total_m, 1.0, tl.exp2(total_m - m_use))
                    w_b = tl.where(m_t == m_i, 1.0, tl.exp2(m_i - m_use))
                    w_b = tl.where(m_i == float("-inf"), 0.0, w_b)
                    total_l = total_l * w_a + l_i * w_b
                    total_acc = total_acc * w_a[:, None] + acc * w_b[:, None]
                    total_m = m_t
            o = total_acc / tl.where(total_l == 0.0, 1.0, total_l)[:, None]
            tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=live[:, None])


def tile_map(query_start_loc: torch.Tensor, num_reqs: int, num_tokens: int, qtok: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(request, first token, end token) of each query tile, [num_tiles] int32 each, with
    request -1 for unused tiles. Device ops only; the tile count, cdiv(num_tokens, qtok) +
    num_reqs, bounds any split of the step's tokens into per-request tiles."""
    qsl = query_start_loc[:num_reqs + 1].long()
    tiles = (qsl[1:] - qsl[:-1] + qtok - 1) // qtok
    cum = torch.cumsum(tiles, 0)
    idx = torch.arange(-(-num_tokens // qtok) + num_reqs, device=qsl.device)
    req = torch.searchsorted(cum, idx, right=True)
    used = req < num_reqs
    req = req.clamp(max=num_reqs - 1)
    first = qsl[req] + (idx - (cum[req] - tiles[req])) * qtok
    return (torch.where(used, req, -1).int(), first.int(), qsl[req + 1].int())


def invariant_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor,
                        positions: torch.Tensor, tiles: tuple[torch.Tensor, ...],
                        block_size: int, scale: float, policy: KernelPolicy) -> torch.Tensor:
    """q [T, Hq, D]; caches [slots, Hkv, D]; block_table [R, pages]; seq_lens [R] (after
    this step); positions [T]; `tiles` from `tile_map` at `query_tokens(group)`. Returns
    [T, Hq, D] (zeros for tokens in no tile: padding). The mode's tiles and splits."""
    group = q.shape[1] // k_cache.shape[1]
    return tiled_attention(q, k_cache, v_cache, block_table, seq_lens, positions, tiles,
                           block_size, scale, query_tokens(group), policy.attention_tile,
                           policy.attention_split)


def tiled_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, positions: torch.Tensor,
                    tiles: tuple[torch.Tensor, ...], block_size: int, scale: float, qtok: int,
                    tile: int, split: int, num_warps: int = NUM_WARPS,
                    num_stages: int = 2) -> torch.Tensor:
    """The kernel at any tile shape: `qtok` query tokens a program (`tiles` listed at it),
    `tile` KV tokens an online-softmax step, splits of `split` tokens (a multiple of
    `tile`), or with `split` 0 one pass over the KV without a split fold."""
    t, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    out = torch.zeros_like(q)
    tile_req, first, end = tiles
    if t:
        _invariant_attention_kernel[(tile_req.shape[0], hkv)](
            q, k_cache, v_cache, out, block_table, seq_lens, positions, tile_req, first, end,
            scale * 1.4426950408889634,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
            v_cache.stride(1), block_table.stride(0), out.stride(0), out.stride(1),
            GROUP=group, QTOK=qtok, BLOCK_M=max(MIN_ROWS, pow2(qtok * group)), D=d,
            PAGE=block_size, TILE=tile, SPLIT=split,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=num_warps, num_stages=num_stages)
    return out
