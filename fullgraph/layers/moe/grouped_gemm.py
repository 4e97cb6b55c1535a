"""The routed experts on CUDA: two grouped GEMMs and a combine, in Triton.

The T * top_k (token, slot) pairs are sorted by expert (routing.sort_by_expert; up to
ALIGN_MAX_PAIRS by one program of `_align_kernel` instead): expert e owns the sorted rows
offsets[e] .. offsets[e + 1], row r being pair perm[r]. Then:
1. gate_up: act[r] = silu(x[t] @ Wg_e.T) * (x[t] @ Wu_e.T), t = perm[r] // top_k, in
   sorted order `[P, I]`; the activation is the GEMM's epilogue (one rounding).
2. down: y[perm[r]] = act[r] @ Wd_e.T, stored in pair order `[P, H]` = `[T, top_k, H]`.
3. combine: out[t] = sum_j w[t, j] * y[t, j] (+ sigmoid(g[t]) * shared[t]) in float32, the
   slots in order: no atomics, so a step's result never depends on timing.
A program of 1 or 2 is one (expert, row tile, column tile). The row tiles of all experts are
numbered in expert order, and each program finds its own from `offsets` (a cumsum of tiles
per expert, in registers), so no host or extra kernel builds a tile list. The grid is the
most row tiles any routing can need, `max_row_tiles`, times the column tiles: it depends on
T, top_k and E only, never on device values, so one graph serves every routing; programs
past the routing's last tile exit at once. An expert's weight tile is read by that expert's
row tiles only: once a step at decode, where an expert gets a few rows (one row tile).
"""
from __future__ import annotations

import torch

from fullgraph.layers.moe.routing import sort_by_expert
from fullgraph.layers.launch import Launcher, cdiv, next_power_of_2
from fullgraph.layers.pdl import pdl_enabled

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: moe_experts takes the torch reference
    triton = None


if triton is not None:
    @triton.jit
    def _align_kernel(ids_ptr, perm_ptr, offsets_ptr, P, BLOCK_P: tl.constexpr,
                      BLOCK_E: tl.constexpr, USE_PDL: tl.constexpr):
        """routing.sort_by_expert for up to BLOCK_P pairs in one program (int32 outputs)."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        p = tl.arange(0, BLOCK_P)
        valid = p < P
        ids = tl.load(ids_ptr + p, mask=valid, other=0).to(tl.int32)
        # one sort of (expert, pair) packed keys: by expert, pair order within one (stable);
        # padding lanes sort last
        keys = tl.sort(tl.where(valid, ids, BLOCK_E) * BLOCK_P + p)
        tl.store(perm_ptr + p, keys % BLOCK_P, mask=valid)
        counts = tl.histogram(ids, BLOCK_E)        # padding lanes counted as expert 0
        ex = tl.arange(0, BLOCK_E)
        counts -= tl.where(ex == 0, BLOCK_P - P, 0)
        tl.store(offsets_ptr + ex, tl.cumsum(counts, 0) - counts)
        tl.store(offsets_ptr + BLOCK_E, P)

    _align_launcher = Launcher(_align_kernel)

    @triton.jit
    def _expert_tile(offsets_ptr, pid_m, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
        """(expert, first row, end row) of row tile `pid_m`; expert >= E past the last."""
        ex = tl.arange(0, BLOCK_E)
        lo = tl.load(offsets_ptr + ex, mask=ex < E, other=0)
        hi = tl.load(offsets_ptr + ex + 1, mask=ex < E, other=0)
        tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
        tile_end = tl.cumsum(tiles, 0)
        # experts whose tiles all come before pid_m (empty ones included) = its expert
        e = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
        mine = ex == e
        first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), 0)
        start = tl.sum(tl.where(mine, lo, 0), 0) + (pid_m - first_tile) * BLOCK_M
        return e, start, tl.sum(tl.where(mine, hi, 0), 0)

    @triton.jit
    def _gate_up_kernel(x_ptr, w_ptr, act_ptr, perm_ptr, offsets_ptr, E, N, K, stride_xm,
                        stride_we, stride_wn, stride_am, TOP_K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_E: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                        USE_PDL: tl.constexpr):
        """w `[E, 2N, K]` (gate rows, then up rows); act `[P, N]`."""
        if USE_PDL:                # which weights to read depends on the routing: wait first
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        e, start, end = _expert_tile(offsets_ptr, tl.program_id(0), E, BLOCK_M, BLOCK_E)
        if e < E:
            offs_m = start + tl.arange(0, BLOCK_M)
            mask_m = offs_m < end
            tok = tl.load(perm_ptr + offs_m, mask=mask_m, other=0) // TOP_K
            offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            offs_k = tl.arange(0, BLOCK_K)
            a_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :]
            g_ptrs = (w_ptr + e.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn
                      + offs_k[:, None])                       # [BLOCK_K, BLOCK_N]
            u_ptrs = g_ptrs + N * stride_wn
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask_a, mask_w = mask_m[:, None], mask_n[None, :]
                if not EVEN_K:
                    mask_a = mask_a & (offs_k < K - k0)[None, :]
                    mask_w = mask_w & (offs_k < K - k0)[:, None]
                a = tl.load(a_ptrs, mask=mask_a, other=0.0)
                acc_g = tl.dot(a, tl.load(g_ptrs, mask=mask_w, other=0.0), acc_g,
                               input_precision=PRECISION)
                acc_u = tl.dot(a, tl.load(u_ptrs, mask=mask_w, other=0.0), acc_u,
                               input_precision=PRECISION)
                a_ptrs += BLOCK_K
                g_ptrs += BLOCK_K
                u_ptrs += BLOCK_K
            h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
            tl.store(act_ptr + offs_m[:, None] * stride_am + offs_n[None, :],
                     h.to(act_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    _gate_up_launcher = Launcher(_gate_up_kernel)

    @triton.jit
    def _down_kernel(a_ptr, w_ptr, y_ptr, perm_ptr, offsets_ptr, E, N, K, stride_am, stride_we,
                     stride_wn, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, EVEN_K: tl.constexpr,
                     PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
        """a `[P, K]` sorted rows, w `[E, N, K]`; y `[P, N]` in pair order."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        e, start, end = _expert_tile(offsets_ptr, tl.program_id(0), E, BLOCK_M, BLOCK_E)
        if e < E:
            offs_m = start + tl.arange(0, BLOCK_M)
            mask_m = offs_m < end
            offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            offs_k = tl.arange(0, BLOCK_K)
            a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
            w_ptrs = (w_ptr + e.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn
                      + offs_k[:, None])
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask_a, mask_w = mask_m[:, None], mask_n[None, :]
                if not EVEN_K:
                    mask_a = mask_a & (offs_k < K - k0)[None, :]
                    mask_w = mask_w & (offs_k < K - k0)[:, None]
                acc = tl.dot(tl.load(a_ptrs, mask=mask_a, other=0.0),
                             tl.load(w_ptrs, mask=mask_w, other=0.0), acc,
                             input_precision=PRECISION)
                a_ptrs += BLOCK_K
                w_ptrs += BLOCK_K
            pair = tl.load(perm_ptr + offs_m, mask=mask_m, other=0)
            tl.store(y_ptr + pair[:, None] * stride_ym + offs_n[None, :],
                     acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    _down_launcher = Launcher(_down_kernel)

    @triton.jit
    def _combine_kernel(y_ptr, w_ptr, s_ptr, g_ptr, out_ptr, H, stride_wt, stride_st,
                        stride_gt, stride_ot, TOP_K: tl.constexpr, HAS_SHARED: tl.constexpr,
                        BLOCK_H: tl.constexpr, USE_PDL: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = offs < H
        if HAS_SHARED:
            # Written before the op's first kernel, which had completed before the grouped
            # GEMM before this one let it launch (layers/pdl.py): safe before the wait.
            s = tl.load(s_ptr + t * stride_st + offs, mask=mask, other=0.0).to(tl.float32)
            gate = tl.sigmoid(tl.load(g_ptr + t * stride_gt).to(tl.float32))
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            w = tl.load(w_ptr + t * stride_wt + j).to(tl.float32)
            acc += w * tl.load(y_ptr + (t * TOP_K + j) * H + offs, mask=mask,
                               other=0.0).to(tl.float32)
        if HAS_SHARED:
            acc += gate * s
        tl.store(out_ptr + t * stride_ot + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    _combine_launcher = Launcher(_combine_kernel)


# Up to this many (token, slot) pairs one program sorts them (`_align_kernel`); above, torch's
# sort is faster (measured: docs/benchmarks.md, fourteenth session).
ALIGN_MAX_PAIRS = 1024


def max_row_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The most row tiles any routing of `num_pairs` pairs can need: sum_e ceil(c_e / BM)
    with sum_e c_e = P over at most min(E, P) non-empty experts."""
    return (num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m


def tile_config(num_pairs: int, num_experts: int, n: int, k: int,
                gate_up: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) from shapes alone (a graph's
    kernels must not depend on the routing). The row tile follows the mean rows per
    active expert. gate_up's BLOCK_N counts gate columns: each program computes BLOCK_N gate
    and BLOCK_N up columns, two accumulators. Rules, not tuned per shape: a sweep found no
    candidate much better (docs/benchmarks.md, fourteenth session)."""
    rows = num_pairs / max(1, min(num_experts, num_pairs))
    block_k = max(16, min(128 if rows <= 16 else 64, next_power_of_2(k)))
    if rows <= 16:       # decode: weight-bandwidth bound, narrow tiles for many programs
        return 16, (32 if gate_up else 64), block_k, 4, 4
    if rows <= 64:
        return 32, 64, block_k, 4, 4
    return 64, (64 if gate_up else 128), block_k, (4 if gate_up else 8), 3


def experts_triton(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   gate_up: torch.Tensor, down: torch.Tensor, shared: torch.Tensor | None = None,
                   shared_gate: torch.Tensor | None = None,
                   configs: tuple[tuple[int, ...], tuple[int, ...]] | None = None
                   ) -> torch.Tensor:
    """reference.experts_reference's contract on CUDA (same roundings). `configs` overrides
    the two GEMMs' tile_config (benchmark probes)."""
    T, H = x.shape
    top_k = topk_ids.shape[1]
    E, I = gate_up.shape[0], gate_up.shape[1] // 2
    if gate_up.dtype != x.dtype or down.dtype != x.dtype:
        raise TypeError(f"expert weights {gate_up.dtype}/{down.dtype} for input {x.dtype}")
    out = torch.empty_like(x)
    if T == 0:
        return out
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    topk_weights = topk_weights.contiguous()
    P = T * top_k
    pdl = pdl_enabled(x)
    block_e = max(16, next_power_of_2(E))
    if P <= ALIGN_MAX_PAIRS:
        block_p = max(16, next_power_of_2(P))
        perm = torch.empty(P, dtype=torch.int32, device=x.device)
        offsets = torch.empty(block_e + 1, dtype=torch.int32, device=x.device)
        _align_launcher[(1,)](topk_ids.contiguous(), perm, offsets, P, BLOCK_P=block_p,
                              BLOCK_E=block_e, USE_PDL=pdl, num_warps=4,
                              launch_pdl=pdl)
    else:
        perm, offsets = sort_by_expert(topk_ids, E)
    act = x.new_empty(P, I)
    y = x.new_empty(P, H)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"   # no TF32 for float32 models
    cfg_gu, cfg_dn = configs or (tile_config(P, E, I, H, True), tile_config(P, E, H, I, False))

    bm, bn, bk, warps, stages = cfg_gu
    _gate_up_launcher[(max_row_tiles(P, E, bm), cdiv(I, bn))](
        x, gate_up, act, perm, offsets, E, I, H, x.stride(0), gate_up.stride(0),
        gate_up.stride(1), act.stride(0), TOP_K=top_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        BLOCK_E=block_e, EVEN_K=H % bk == 0, PRECISION=precision, USE_PDL=pdl,
        num_warps=warps, num_stages=stages, launch_pdl=pdl)
    bm, bn, bk, warps, stages = cfg_dn
    _down_launcher[(max_row_tiles(P, E, bm), cdiv(H, bn))](
        act, down, y, perm, offsets, E, H, I, act.stride(0), down.stride(0), down.stride(1),
        y.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=block_e,
        EVEN_K=I % bk == 0, PRECISION=precision, USE_PDL=pdl, num_warps=warps,
        num_stages=stages, launch_pdl=pdl)
    has_shared = shared is not None
    s = shared.contiguous() if has_shared else x
    g = shared_gate if has_shared else x
    block_h = min(1024, next_power_of_2(H))
    _combine_launcher[(T, cdiv(H, block_h))](
        y, topk_weights, s, g, out, H, topk_weights.stride(0), s.stride(0), g.stride(0),
        out.stride(0), TOP_K=top_k, HAS_SHARED=has_shared, BLOCK_H=block_h, USE_PDL=pdl,
        num_warps=4, launch_pdl=pdl)
    return out
