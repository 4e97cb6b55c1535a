"""The batch-invariant mode's attention on the GPU: one Triton kernel for prefill, mixed and
decode steps, in which a token's result depends on its own q and its request's K/V only.

It computes what attention/invariant.py's `paged_attention` (the CPU reference) describes:

* a program takes one query tile (up to `query_tokens` consecutive tokens of one request,
  times the GROUP query heads of one KV head, GQA packing: `BLOCK_M` rows) and walks its
  request's KV in logical order through the block table, this step's K/V included (stored
  before the kernel runs, never taken from registers);
* KV positions are cut into splits of `attention_split` tokens at absolute positions; a
  split runs an online softmax over tiles of `attention_tile_for(D)` tokens, in order, from an
  empty state (float32); the splits are folded into the result one at a time, in order;
* a row's scores are its own dot products, masked past its position, so the tile's other
  rows, padding rows, and the tiles and splits past the row's position change nothing: a
  masked tile leaves a row's state exactly as it was (its scale factor is set to 1, its
  probabilities are exp2(-inf) = 0). A decode row (a tile of its own) and the same row
  inside a prefill tile therefore run the same operations on the same values. The KV tiles
  that every live row of a query tile sees whole skip the mask, which would keep each of
  their scores as it is: the same values either way, less work a tile.

The tile shape is fixed (never chosen from the batch), so one compiled kernel serves every
step. The query tiles are listed on the device from `query_start_loc` (`tile_map`), to a
count fixed by the step's padded shape, so graphs capture it. A program walks its tile's
splits in turn; a launch of few tiles (a decode step of a few requests, otherwise
`num_kv_heads` programs a request) spreads each tile's splits over several programs, and the
last to finish folds their stored states in split order: the same fold, so the same bits,
which is why the program count may follow the batch (`split_programs`). With PDL
(layers/pdl.py) the kernel launches while the one before it finishes and waits for it
before any load.
"""
from __future__ import annotations

import torch

from fullgraph.layers.launch import Launcher, next_power_of_2
from fullgraph.layers.pdl import pdl_enabled
from fullgraph.layers.policy import KernelPolicy

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: attention/invariant.py's reference runs
    triton = None

MIN_ROWS = 16                  # tl.dot's smallest M
NUM_WARPS = 4
PART_TOKENS = 8192             # KV positions a tile's split states cover in the workspace


def query_tokens(group: int) -> int:
    """Tokens per query tile: GQA groups packed to tl.dot's 16 rows."""
    return max(1, MIN_ROWS // group)


def block_rows(qtok: int, group: int) -> int:
    """The kernel's BLOCK_M: a tile's (token, query head) rows, padded for tl.dot."""
    return max(MIN_ROWS, next_power_of_2(qtok * group))


if triton is not None:
    @triton.jit
    def _pages(bt_row, kv_pos, seq_len, PAGE: tl.constexpr):
        """The block-table entries of a KV tile's positions (0 past the sequence)."""
        return tl.load(bt_row + kv_pos // PAGE, mask=kv_pos < seq_len, other=0)

    @triton.jit
    def _load_kv(k_head, v_head, stride_ks, stride_vs, page, kv_pos, seq_len, d,
                 PAGE: tl.constexpr, MASKED: tl.constexpr):
        """A KV tile's K and V through its block-table entries; MASKED: zeros past the
        sequence, else every position is inside it."""
        slot = page.to(tl.int64) * PAGE + kv_pos % PAGE
        k_at = k_head + slot[:, None] * stride_ks + d[None, :]
        v_at = v_head + slot[:, None] * stride_vs + d[None, :]
        if MASKED:
            inside = (kv_pos < seq_len)[:, None]
            return (tl.load(k_at, mask=inside, other=0.0),
                    tl.load(v_at, mask=inside, other=0.0))
        return tl.load(k_at), tl.load(v_at)

    @triton.jit
    def _softmax_step(q, pos, kv_pos, seq_len, k, v, scale_log2e, m_i, l_i, acc,
                      PRECISION: tl.constexpr, MASKED: tl.constexpr):
        """One online-softmax step over the KV tile at logical positions `kv_pos`. MASKED
        false: every row sees every position of the tile, where the mask would keep every
        score as it is, so both give the same bits."""
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e
        if MASKED:
            seen = (kv_pos[None, :] <= pos[:, None]) & (kv_pos < seq_len)[None, :]
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
    def _tile_range(q, pos, j_from, j_to, page, seq_len, bt_row, k_head, v_head, stride_ks,
                    stride_vs, scale_log2e, m_i, l_i, acc, d, n, PAGE: tl.constexpr,
                    TILE: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
        """The online-softmax steps over the KV tiles at j_from, j_from + TILE, ... below
        j_to; `page` holds j_from's block-table entries, and each tile loads the next one's
        while it computes. Returns the next tile's entries and the state."""
        for j0 in range(j_from, j_to, TILE):
            k, v = _load_kv(k_head, v_head, stride_ks, stride_vs, page, j0 + n, seq_len, d,
                            PAGE, MASKED)
            page = _pages(bt_row, j0 + TILE + n, seq_len, PAGE)
            m_i, l_i, acc = _softmax_step(q, pos, j0 + n, seq_len, k, v, scale_log2e, m_i,
                                          l_i, acc, PRECISION, MASKED)
        return page, m_i, l_i, acc

    @triton.jit
    def _tiles(q, pos, j_start, j_end, seen_end, seq_len, bt_row, k_head, v_head, stride_ks,
               stride_vs, scale_log2e, m_i, l_i, acc, d, n, PAGE: tl.constexpr,
               TILE: tl.constexpr, PRECISION: tl.constexpr):
        """The online softmax over the KV tiles at j_start, j_start + TILE, ... below j_end,
        continuing (m_i, l_i, acc): unmasked below `seen_end` (positions every live row of
        the tile sees, a multiple of TILE), masked from there. Triton's pipeliner issues each
        tile's K and V ahead."""
        mid = tl.maximum(tl.minimum(j_end, seen_end), j_start)
        page = _pages(bt_row, j_start + n, seq_len, PAGE)
        page, m_i, l_i, acc = _tile_range(q, pos, j_start, mid, page, seq_len, bt_row, k_head,
                                          v_head, stride_ks, stride_vs, scale_log2e, m_i, l_i,
                                          acc, d, n, PAGE, TILE, PRECISION, False)
        page, m_i, l_i, acc = _tile_range(q, pos, mid, j_end, page, seq_len, bt_row, k_head,
                                          v_head, stride_ks, stride_vs, scale_log2e, m_i, l_i,
                                          acc, d, n, PAGE, TILE, PRECISION, True)
        return m_i, l_i, acc

    @triton.jit
    def _split(q, pos, s0, last, seen_end, seq_len, bt_row, k_head, v_head, stride_ks,
               stride_vs, scale_log2e, d, n, BLOCK_M: tl.constexpr, D: tl.constexpr,
               PAGE: tl.constexpr, TILE: tl.constexpr, SPLIT: tl.constexpr,
               PRECISION: tl.constexpr):
        """The online-softmax state of the split at `s0`, from an empty one."""
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        return _tiles(q, pos, s0, tl.minimum(s0 + SPLIT, last + 1), seen_end, seq_len, bt_row,
                      k_head, v_head, stride_ks, stride_vs, scale_log2e, m_i, l_i, acc, d, n,
                      PAGE, TILE, PRECISION)

    @triton.jit
    def _fold(total_m, total_l, total_acc, m_i, l_i, acc):
        """Fold one split's state into the running one (invariant.merge_split). The FMAs are
        explicit: the same rounding wherever the fold is inlined."""
        m_t = tl.maximum(total_m, m_i)
        m_use = tl.where(m_t == float("-inf"), 0.0, m_t)
        w_a = tl.where(m_t == total_m, 1.0, tl.exp2(total_m - m_use))
        w_b = tl.where(m_t == m_i, 1.0, tl.exp2(m_i - m_use))
        w_b = tl.where(m_i == float("-inf"), 0.0, w_b)
        return (m_t, tl.fma(total_l, w_a, l_i * w_b),
                tl.fma(total_acc, w_a[:, None], acc * w_b[:, None]))

    @triton.jit
    def _finish(out_ptr, tok, head, d, stride_ot, stride_oh, total_l, total_acc, live):
        """Store the normalized result of a folded state (rows that saw nothing: zeros).
        The output's addresses are made here, after the KV walk: live across it they would
        hold registers the walk needs."""
        o = total_acc / tl.where(total_l == 0.0, 1.0, total_l)[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=live[:, None])

    @triton.jit
    def _walk(q, pos, last, seen_end, seq_len, bt_row, k_head, v_head, stride_ks, stride_vs,
              scale_log2e, d, n, BLOCK_M: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
              TILE: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
        """Every split up to `last` by this program, folded in order (SPLIT 0: one online
        softmax over the whole KV, no fold). Returns (sum, accumulator)."""
        total_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total_l = tl.zeros([BLOCK_M], tl.float32)
        total_acc = tl.zeros([BLOCK_M, D], tl.float32)
        if SPLIT == 0:
            total_m, total_l, total_acc = _tiles(
                q, pos, 0, last + 1, seen_end, seq_len, bt_row, k_head, v_head, stride_ks,
                stride_vs, scale_log2e, total_m, total_l, total_acc, d, n, PAGE, TILE, PRECISION)
        else:
            for s0 in range(0, last + 1, SPLIT):
                m_i, l_i, acc = _split(q, pos, s0, last, seen_end, seq_len, bt_row, k_head,
                                       v_head, stride_ks, stride_vs, scale_log2e, d, n, BLOCK_M,
                                       D, PAGE, TILE, SPLIT, PRECISION)
                total_m, total_l, total_acc = _fold(total_m, total_l, total_acc, m_i, l_i, acc)
        return total_l, total_acc

    @triton.jit
    def _invariant_attention_kernel(
            q_ptr, k_ptr, v_ptr, out_ptr, block_table_ptr, seq_lens_ptr, positions_ptr,
            tile_req_ptr, tile_first_ptr, tile_end_ptr, part_acc_ptr, part_ml_ptr, counter_ptr,
            scale_log2e, stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
            stride_bt, stride_ot, stride_oh,
            GROUP: tl.constexpr, QTOK: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr,
            PAGE: tl.constexpr, TILE: tl.constexpr, SPLIT: tl.constexpr,
            PROGRAMS: tl.constexpr, PART_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
            USE_PDL: tl.constexpr):
        """Program (KV head, query tile, p). PROGRAMS 1: the program walks every split
        (`_walk`). PROGRAMS > 1: program p takes splits p, p + PROGRAMS, ..., stores each
        split's state, and the last of the tile's programs to arrive (an acquire/release
        atomic) folds them all in split order, the arithmetic of `_walk`; a tile with more
        than PART_SPLITS splits (the workspace's) is walked by its program 0 alone."""
        if USE_PDL:                    # nothing is loaded before the previous kernel is done
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        h = tl.program_id(0)
        i = tl.num_programs(1) - 1 - tl.program_id(1)   # a request's last, longest tiles first
        r = tl.load(tile_req_ptr + i)
        first = tl.load(tile_first_ptr + i)
        end = tl.load(tile_end_ptr + i)
        m = tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        if r >= 0:
            tok = first + m // GROUP
            head = h * GROUP + m % GROUP
            live = (m < QTOK * GROUP) & (tok < end)
            tok = tok.to(tl.int64)
            n = tl.arange(0, TILE)
            q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh
                        + d[None, :], mask=live[:, None], other=0.0)
            pos = tl.load(positions_ptr + tok, mask=live, other=-1)
            seq_len = tl.load(seq_lens_ptr + r)
            last = tl.max(pos, 0)                       # the tile's furthest position
            # the KV tiles below this are seen whole by every live row: no mask there
            seen_end = (tl.min(tl.where(live, pos, last), 0) + 1) // TILE * TILE
            bt_row = block_table_ptr + r.to(tl.int64) * stride_bt
            k_head, v_head = k_ptr + h * stride_kh, v_ptr + h * stride_vh
            if PROGRAMS == 1:
                total_l, total_acc = _walk(q, pos, last, seen_end, seq_len, bt_row, k_head,
                                           v_head, stride_ks, stride_vs, scale_log2e, d, n,
                                           BLOCK_M, D, PAGE, TILE, SPLIT, PRECISION)
                _finish(out_ptr, tok, head, d, stride_ot, stride_oh, total_l, total_acc, live)
            else:
                p = tl.program_id(2)
                num_splits = last // SPLIT + 1
                if num_splits > PART_SPLITS:
                    if p == 0:
                        total_l, total_acc = _walk(q, pos, last, seen_end, seq_len, bt_row,
                                                   k_head, v_head, stride_ks, stride_vs,
                                                   scale_log2e, d, n, BLOCK_M, D, PAGE, TILE,
                                                   SPLIT, PRECISION)
                        _finish(out_ptr, tok, head, d, stride_ot, stride_oh, total_l, total_acc,
                                live)
                else:
                    pair = i * tl.num_programs(0) + h
                    base = (pair * PART_SPLITS).to(tl.int64) * BLOCK_M
                    for s in range(p, num_splits, PROGRAMS):
                        m_i, l_i, acc = _split(q, pos, s * SPLIT, last, seen_end, seq_len,
                                               bt_row, k_head, v_head, stride_ks, stride_vs,
                                               scale_log2e, d, n, BLOCK_M, D, PAGE, TILE, SPLIT,
                                               PRECISION)
                        part = base + s * BLOCK_M + m
                        tl.store(part_ml_ptr + 2 * part, m_i, mask=live)
                        tl.store(part_ml_ptr + 2 * part + 1, l_i, mask=live)
                        tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc,
                                 mask=live[:, None])
                    tl.debug_barrier()         # every thread's partials before the count
                    arrived = tl.atomic_add(counter_ptr + pair, 1, sem="acq_rel")
                    if arrived == PROGRAMS - 1:
                        total_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
                        total_l = tl.zeros([BLOCK_M], tl.float32)
                        total_acc = tl.zeros([BLOCK_M, D], tl.float32)
                        for s in range(0, num_splits):
                            part = base + s * BLOCK_M + m
                            # .cg: from L2, where the other programs' stores landed
                            m_i = tl.load(part_ml_ptr + 2 * part, mask=live,
                                          other=float("-inf"), cache_modifier=".cg")
                            l_i = tl.load(part_ml_ptr + 2 * part + 1, mask=live, other=0.0,
                                          cache_modifier=".cg")
                            acc = tl.load(part_acc_ptr + part[:, None] * D + d[None, :],
                                          mask=live[:, None], other=0.0, cache_modifier=".cg")
                            total_m, total_l, total_acc = _fold(total_m, total_l, total_acc,
                                                                m_i, l_i, acc)
                        _finish(out_ptr, tok, head, d, stride_ot, stride_oh, total_l, total_acc,
                                live)
                        tl.store(counter_ptr + pair, 0)   # the next launch starts from zero
        elif tl.program_id(2) == 0:    # padding tokens past the last request: zeros
            tok = (first + m // GROUP).to(tl.int64)
            head = h * GROUP + m % GROUP
            tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                     tl.zeros([BLOCK_M, D], out_ptr.dtype.element_ty),
                     mask=((m < QTOK * GROUP) & (tok < end))[:, None])

    _invariant_attention_launcher = Launcher(_invariant_attention_kernel)


def tile_map(query_start_loc: torch.Tensor, num_reqs: int, num_tokens: int, qtok: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(request, first token, end token) of each query tile, [num_tiles] int32 each. Device
    ops only; the tile count, cdiv(num_tokens, qtok) + num_reqs, bounds any split of the
    step's tokens into per-request tiles. The tiles left over have request -1 and cover the
    padding tokens past the last request, `qtok` a tile up to `num_tokens` (the kernel
    writes their rows zeros): the bound leaves at least cdiv(padding, qtok) of them."""
    qsl = query_start_loc[:num_reqs + 1].long()
    tiles = (qsl[1:] - qsl[:-1] + qtok - 1) // qtok
    cum = torch.cumsum(tiles, 0)
    idx = torch.arange(-(-num_tokens // qtok) + num_reqs, device=qsl.device)
    req = torch.searchsorted(cum, idx, right=True)
    used = req < num_reqs
    req = req.clamp(max=num_reqs - 1)
    first = torch.where(used, qsl[req] + (idx - (cum[req] - tiles[req])) * qtok,
                        qsl[-1] + (idx - cum[-1]) * qtok)
    end = torch.where(used, qsl[req + 1], num_tokens)
    return torch.where(used, req, -1).int(), first.int(), end.int()


class SplitWorkspace:
    """The split states of launches spread over several programs per query tile, and their
    arrival counters (one per tile and KV head, left at zero by every launch), allocated
    once for the most tiles such a launch may have and `part_splits` splits a tile."""

    def __init__(self, max_tiles: int, num_kv_heads: int, part_splits: int, block_m: int,
                 head_dim: int, device: torch.device) -> None:
        parts = max_tiles * num_kv_heads * part_splits * block_m
        self.acc = torch.empty(parts * head_dim, dtype=torch.float32, device=device)
        self.ml = torch.empty(2 * parts, dtype=torch.float32, device=device)
        self.counters = torch.zeros(max_tiles * num_kv_heads, dtype=torch.int32, device=device)
        self.max_tiles, self.part_splits = max_tiles, part_splits

    @classmethod
    def for_spec(cls, num_heads: int, num_kv_heads: int, head_dim: int, max_len: int,
                 split: int, num_sms: int, device: torch.device) -> SplitWorkspace:
        """Launches of up to an SM's worth of (tile, KV head) pairs (a decode step of a few
        requests; two tiles at least: one request's bound), splits covering up to
        `PART_TOKENS` positions (longer tiles are walked by one program)."""
        group = num_heads // num_kv_heads
        return cls(max(2, num_sms // num_kv_heads), num_kv_heads,
                   -(-min(max_len, PART_TOKENS) // split),
                   block_rows(query_tokens(group), group), head_dim, device)


def split_programs(num_tiles: int, num_kv_heads: int, num_sms: int,
                   workspace: SplitWorkspace | None) -> int:
    """Programs per (query tile, KV head): a power of two giving ~2 programs per SM when
    the launch's pairs leave SMs idle, else 1. Any count gives the same bits (the splits are
    folded in order either way), so it may follow the batch."""
    if workspace is None or num_tiles > workspace.max_tiles:
        return 1
    per_pair = 2 * num_sms // (num_tiles * num_kv_heads)
    if per_pair < 2:
        return 1
    return min(1 << (per_pair.bit_length() - 1), next_power_of_2(workspace.part_splits))


def invariant_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor,
                        positions: torch.Tensor, tiles: tuple[torch.Tensor, ...],
                        block_size: int, scale: float, policy: KernelPolicy,
                        workspace: SplitWorkspace | None = None, num_sms: int = 0
                        ) -> torch.Tensor:
    """q [T, Hq, D]; caches [slots, Hkv, D]; block_table [R, pages]; seq_lens [R] (after
    this step); positions [T]; `tiles` from `tile_map` at `query_tokens(group)`. Returns
    [T, Hq, D] (zeros for the padding tokens past the last request). The mode's tiles and
    splits; with a workspace, a launch of few tiles spreads each tile's splits over programs
    (`split_programs`)."""
    group = q.shape[1] // k_cache.shape[1]
    programs = split_programs(tiles[0].shape[0], k_cache.shape[1], num_sms, workspace)
    return tiled_attention(q, k_cache, v_cache, block_table, seq_lens, positions, tiles,
                           block_size, scale, query_tokens(group),
                           policy.attention_tile_for(q.shape[2]),
                           policy.attention_split, programs=programs, workspace=workspace)


def tiled_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, positions: torch.Tensor,
                    tiles: tuple[torch.Tensor, ...], block_size: int, scale: float, qtok: int,
                    tile: int, split: int, num_warps: int = NUM_WARPS, num_stages: int = 2,
                    programs: int = 1, workspace: SplitWorkspace | None = None) -> torch.Tensor:
    """The kernel at any tile shape: `qtok` query tokens a program (`tiles` listed at it),
    `tile` KV tokens an online-softmax step, splits of `split` tokens (a multiple of
    `tile`), or with `split` 0 one pass over the KV without a split fold; `programs` per
    (tile, KV head) with splits and a workspace."""
    t, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    out = torch.empty_like(q)          # every row is written: padding rows zeros
    tile_req, first, end = tiles
    if programs > 1 and (split == 0 or workspace is None
                         or tile_req.shape[0] > workspace.max_tiles):
        raise ValueError(f"{programs} programs a query tile need splits and a workspace for "
                         f"{tile_req.shape[0]} tiles")
    parts = ((workspace.acc, workspace.ml, workspace.counters, workspace.part_splits)
             if programs > 1 else (out, out, out, 1))
    if t:
        pdl = pdl_enabled(q)
        _invariant_attention_launcher[(hkv, tile_req.shape[0], programs)](
            q, k_cache, v_cache, out, block_table, seq_lens, positions, tile_req, first, end,
            *parts[:3], scale * 1.4426950408889634,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
            v_cache.stride(1), block_table.stride(0), out.stride(0), out.stride(1),
            GROUP=group, QTOK=qtok, BLOCK_M=block_rows(qtok, group), D=d,
            PAGE=block_size, TILE=tile, SPLIT=split, PROGRAMS=programs, PART_SPLITS=parts[3],
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", USE_PDL=pdl,
            num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl)
    return out
