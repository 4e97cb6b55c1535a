"""Paged decode attention as one Triton kernel (the decode layout of the flex backend, CUDA).

Flex decoding cost three kernels per layer (8.7 µs per layer at batch 1 on an H100, 25 µs at
batch 8) and a compile per power-of-two batch size (most of the capture time then). This
kernel reads the block table directly and reduces its KV splits itself:

* program (request r, KV head h, split s) takes the request's 64-token tiles s,
  s + num_splits, s + 2 * num_splits, ... (a tile gathers its tokens' slots through the
  block table, so small pages cost no extra loop iterations; the interleaving lets the first
  tile's block-table load start before the request's length is known), for all
  `GROUP * query_len` query rows that share KV head h (GQA packing; the rows are padded to
  16 for `tl.dot`), with an online softmax in float32;
* with one split it writes the output; otherwise it writes its partial (max, sum, unnormalized
  accumulator), and the last split of (r, h) to arrive — counted with an atomic whose
  acquire/release orders the partials — combines them in split order and resets the counter
  for the next call. The combination therefore does not depend on which split finished last.

Query row `t` of a request sits at position `seq_len - query_len + t` and sees the keys at
positions up to its own (causal within a multi-token verify step). Rows with `seq_len == 0`
(batch padding) produce zeros. The splits of a request depend on its length and
`num_splits` only.
"""
from __future__ import annotations

import torch

from fullgraph.layers.launch import Launcher, next_power_of_2
from fullgraph.layers.pdl import pdl_enabled

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: the flex path runs instead
    triton = None

MIN_BLOCK_M = 16               # tl.dot's smallest M
TILE_TOKENS = 64               # KV tokens per loop iteration (several pages of small blocks)
COMBINE_ELEMENTS = 64          # split rows merged per load in the combination
NUM_WARPS = 4
MAX_SPLITS = 16
MAX_QUERY_ROWS = 64            # GROUP * query_len; longer uniform queries use flex decoding


def tiling(block_size: int, rows_p2: int, num_splits: int) -> dict[str, int]:
    """The tile constexprs both decode kernels launch with (this one and paged_decode_qk.py)."""
    return {"TILE": max(TILE_TOKENS, next_power_of_2(block_size)),
            "BLOCK_M": max(MIN_BLOCK_M, rows_p2), "ROWS_P2": rows_p2, "NUM_SPLITS": num_splits,
            "CHUNK": max(1, min(num_splits, COMBINE_ELEMENTS // rows_p2))}


def supported(device: torch.device, head_dim: int) -> bool:
    return triton is not None and device.type == "cuda" and head_dim == next_power_of_2(head_dim)


def decode_splits(rows: int, num_kv_heads: int, num_sms: int) -> int:
    """KV splits per (request, KV head): a power of two giving ~2 programs per SM.

    Measured on an H100 at 640 tokens (benchmarks/probes/paged_decode.py): batch 1 is best
    with 16 splits, 8 with 4, 32 and 128 with 1."""
    per_pair = 2 * num_sms // max(1, rows * num_kv_heads)
    return max(1, min(MAX_SPLITS, 1 << max(0, per_pair.bit_length() - 1)))


def pipeline_stages(num_splits: int) -> int:
    """Triton's software-pipelining stages for the KV loop: 3 with splits (short walks), 2
    for one long walk a program, as measured in the tenth session (docs/benchmarks.md). The
    stages change when loads issue, not the arithmetic: compiled for sm_90 as the JIT
    specializes our launches, the K/V loads become asynchronous copies at 2 stages and more
    (docs/benchmarks.md, twenty-eighth session)."""
    return 3 if num_splits > 1 else 2


if triton is not None:
    @triton.jit
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, block_table_ptr, seq_lens_ptr,
                             part_acc_ptr, part_ml_ptr, counter_ptr, scale_log2e, max_kv,
                             stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
                             stride_bt, stride_ot, stride_oh,
                             QUERY_LEN: tl.constexpr, GROUP: tl.constexpr, HKV: tl.constexpr,
                             D: tl.constexpr, PAGE: tl.constexpr, TILE: tl.constexpr,
                             BLOCK_M: tl.constexpr, ROWS_P2: tl.constexpr,
                             NUM_SPLITS: tl.constexpr, CHUNK: tl.constexpr,
                             PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
        r = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        ROWS: tl.constexpr = GROUP * QUERY_LEN
        m = tl.arange(0, BLOCK_M)
        t = m // GROUP                     # query token of the row
        head = h * GROUP + m % GROUP       # query head of the row
        live = m < ROWS
        d = tl.arange(0, D)
        n = tl.arange(0, TILE)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        # Split s takes tiles s, s + NUM_SPLITS, ...: its first tile's block-table entries
        # load alongside the length and q (the K/V loads are masked by the length).
        bt_row = block_table_ptr + r.to(tl.int64) * stride_bt
        kv_pos = s * TILE + n
        page = tl.load(bt_row + kv_pos // PAGE, mask=kv_pos < max_kv, other=0)
        seq_len = tl.load(seq_lens_ptr + r)
        tok = r.to(tl.int64) * QUERY_LEN + t
        q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=live[:, None], other=0.0)
        q_pos = seq_len - QUERY_LEN + t
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for _ in range(s, tl.cdiv(seq_len, TILE), NUM_SPLITS):
            inside = kv_pos < seq_len
            slot = page.to(tl.int64) * PAGE + kv_pos % PAGE
            k = tl.load(k_ptr + slot[:, None] * stride_ks + h * stride_kh + d[None, :],
                        mask=inside[:, None], other=0.0)
            v = tl.load(v_ptr + slot[:, None] * stride_vs + h * stride_vh + d[None, :],
                        mask=inside[:, None], other=0.0)
            next_pos = kv_pos + NUM_SPLITS * TILE
            page = tl.load(bt_row + next_pos // PAGE, mask=next_pos < seq_len, other=0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e
            qk = tl.where(kv_pos[None, :] <= q_pos[:, None], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows that saw nothing yet
            alpha = tl.exp2(m_i - m_use)
            pr = tl.exp2(qk - m_use[:, None])
            l_i = l_i * alpha + tl.sum(pr, 1)
            acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
            kv_pos = next_pos
        finish_split(acc, m_i, l_i, out_ptr, part_acc_ptr, part_ml_ptr, counter_ptr, tok, head,
                     r, h, s, stride_ot, stride_oh, QUERY_LEN, GROUP, HKV, D, BLOCK_M, ROWS_P2,
                     NUM_SPLITS, CHUNK)

    _paged_decode_launcher = Launcher(_paged_decode_kernel)

    @triton.jit
    def finish_split(acc, m_i, l_i, out_ptr, part_acc_ptr, part_ml_ptr, counter_ptr, tok, head,
                     r, h, s, stride_ot, stride_oh, QUERY_LEN: tl.constexpr,
                     GROUP: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                     BLOCK_M: tl.constexpr, ROWS_P2: tl.constexpr, NUM_SPLITS: tl.constexpr,
                     CHUNK: tl.constexpr):
        """The end of program (r, h, s): with one split, write the normalized output; else
        write the split's partial, and the last split of (r, h) to arrive merges them all."""
        ROWS: tl.constexpr = GROUP * QUERY_LEN
        m = tl.arange(0, BLOCK_M)
        live = m < ROWS
        d = tl.arange(0, D)
        if NUM_SPLITS == 1:
            o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=live[:, None])
        else:
            pair = r * HKV + h
            part = (pair * NUM_SPLITS + s).to(tl.int64) * ROWS_P2 + m
            tl.store(part_ml_ptr + 2 * part, m_i, mask=live)
            tl.store(part_ml_ptr + 2 * part + 1, l_i, mask=live)
            tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc, mask=live[:, None])
            tl.debug_barrier()             # every thread's partial is written before the count
            arrived = tl.atomic_add(counter_ptr + pair, 1, sem="acq_rel")
            if arrived == NUM_SPLITS - 1:
                _combine(part_acc_ptr, part_ml_ptr, out_ptr, pair, stride_ot, stride_oh, r,
                         h, QUERY_LEN, GROUP, D, ROWS, ROWS_P2, NUM_SPLITS, CHUNK)
                # a plain store: the kernel boundary orders it before the next launch's
                # atomics, so it need not wait for anything here
                tl.store(counter_ptr + pair, 0)

    @triton.jit
    def _combine(part_acc_ptr, part_ml_ptr, out_ptr, pair, stride_ot, stride_oh, r, h,
                 QUERY_LEN: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                 ROWS: tl.constexpr, ROWS_P2: tl.constexpr, NUM_SPLITS: tl.constexpr,
                 CHUNK: tl.constexpr):
        """Merge the splits' partials of (request, KV head) `pair`, in split order, CHUNK
        splits per load; `.cg` loads read L2, where the other programs' stores landed."""
        sp = tl.arange(0, NUM_SPLITS)[:, None]
        row = tl.arange(0, ROWS_P2)
        live = row < ROWS
        first = (pair * NUM_SPLITS).to(tl.int64) * ROWS_P2
        ml = part_ml_ptr + 2 * (first + sp * ROWS_P2 + row[None, :])
        ms = tl.load(ml, mask=live[None, :], other=float("-inf"), cache_modifier=".cg")
        m_max = tl.max(ms, 0)
        m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
        total = tl.sum(tl.load(ml + 1, mask=live[None, :], other=0.0, cache_modifier=".cg")
                       * tl.exp2(ms - m_use[None, :]), 0)
        c = tl.arange(0, CHUNK)[:, None, None]
        d = tl.arange(0, D)[None, None, :]
        o = tl.zeros([ROWS_P2, D], tl.float32)
        for j in tl.static_range(0, NUM_SPLITS, CHUNK):
            part = first + (j + c) * ROWS_P2 + row[None, :, None]
            w = tl.exp2(tl.load(part_ml_ptr + 2 * part, mask=live[None, :, None],
                                other=float("-inf"), cache_modifier=".cg") - m_use[None, :, None])
            a = tl.load(part_acc_ptr + part * D + d, mask=live[None, :, None], other=0.0,
                        cache_modifier=".cg")
            o += tl.sum(w * a, 0)
        o = o / tl.where(total == 0.0, 1.0, total)[:, None]
        tok = r.to(tl.int64) * QUERY_LEN + row // GROUP
        head = h * GROUP + row % GROUP
        dd = tl.arange(0, D)[None, :]
        tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + dd,
                 o.to(out_ptr.dtype.element_ty), mask=live[:, None])


class PagedDecodeWorkspace:
    """Split partials and arrival counters, allocated once for the largest launch."""

    def __init__(self, max_rows: int, num_kv_heads: int, query_rows: int, max_programs: int,
                 head_dim: int, device: torch.device):
        """`query_rows`: the most GROUP * query_len; `max_programs`: the most
        rows * num_kv_heads * splits of a launch with more than one split."""
        parts = max_programs * next_power_of_2(query_rows)
        self.acc = torch.empty(parts * head_dim, dtype=torch.float32, device=device)
        self.ml = torch.empty(2 * parts, dtype=torch.float32, device=device)
        # One counter per (request, KV head), shared by every layer: launches on one stream
        # run one after another, and each call leaves them at zero.
        self.counters = torch.zeros(max_rows * num_kv_heads, dtype=torch.int32, device=device)
        self.max_parts, self.max_rows = parts, max_rows


def check_launch(num_tokens: int, num_heads: int, num_kv_heads: int, query_len: int,
                 num_splits: int, workspace: PagedDecodeWorkspace) -> tuple[int, int]:
    """(requests, query rows per KV head padded to a power of two) of a launch, or a
    ValueError naming what does not fit."""
    group = num_heads // num_kv_heads
    rows = num_tokens // query_len
    rows_p2 = next_power_of_2(group * query_len)
    if rows_p2 > MAX_QUERY_ROWS:
        raise ValueError(f"paged decode takes at most {MAX_QUERY_ROWS} query rows per KV head, "
                         f"got {group} x {query_len}")
    if num_splits & (num_splits - 1):
        raise ValueError(f"paged decode needs a power-of-two split count, got {num_splits}")
    if rows > workspace.max_rows or (num_splits > 1 and rows * num_kv_heads * num_splits
                                     * rows_p2 > workspace.max_parts):
        raise ValueError(f"paged decode of {rows} rows x {num_splits} splits exceeds its "
                         "workspace")
    return rows, rows_p2


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                 query_len: int, num_splits: int, scale: float, workspace: PagedDecodeWorkspace,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [R * query_len, Hq, D] (request-major); caches [slots, Hkv, D]; block_table
    [>= R, max_pages] int32; seq_lens [R] int32 (after this step).
    Returns [R * query_len, Hq, D]."""
    t, hq, d = q.shape
    hkv = k_cache.shape[1]
    rows, rows_p2 = check_launch(t, hq, hkv, query_len, num_splits, workspace)
    out = torch.empty_like(q) if out is None else out
    pdl = pdl_enabled(q)
    _paged_decode_launcher[(rows, hkv, num_splits)](
        q, k_cache, v_cache, out, block_table, seq_lens, workspace.acc, workspace.ml,
        workspace.counters, scale * 1.4426950408889634, block_table.shape[1] * block_size,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
        v_cache.stride(1), block_table.stride(0), out.stride(0), out.stride(1),
        QUERY_LEN=query_len, GROUP=hq // hkv, HKV=hkv, D=d, PAGE=block_size,
        **tiling(block_size, rows_p2, num_splits),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",   # float32 stays float32
        USE_PDL=pdl, num_warps=NUM_WARPS, num_stages=pipeline_stages(num_splits),
        launch_pdl=pdl)
    return out
