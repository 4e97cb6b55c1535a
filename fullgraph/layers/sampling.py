"""The sampler's Triton kernels (the spec, and the CPU path, is worker/sampler.py).

Every kernel works on whole rows of the [R, V] logits with static shapes and no host
synchronization, so a sampler step is a fixed chain of launches inside a CUDA graph; a
row's work depends only on that row (splits of the vocabulary are fixed per kernel, never
chosen from the batch where the result could depend on them), so results are independent
of the batch. Rows that do not use a feature leave its kernel at their first load.

- Drawing (`_draw_kernel` + `_pick_kernel`): each program scans a slice of a row, keeps
  the best key (s + Gumbel noise, or the logit itself for a greedy row) and its first index;
  the second kernel picks, per row, the first slice holding the maximum (layers/argmax.py's
  scheme). The noise is computed only for blocks whose maximum plus the block's largest
  noise reaches the best key so far. That bound takes the block's hashes but no log (the
  noise is decreasing in the hash, so the smallest hash gives the largest noise), and blocks
  whose maximum plus the largest possible noise (`GUMBEL_MAX`) falls short skip even the
  hashes: with a 152k vocabulary most blocks of a slice stop at one of the two, so the pass
  reads the logits once and takes the logs of few of them.
- Filtering (top-k / top-p / min_p): a threshold per row, with no sort of the vocabulary.
  `_row_max_kernel` (max of s; all min_p needs), `_pivot_kernel` (rows with top-k or
  top-p: count and mass of s >= max - d_j at 16 fixed offsets d_j), `_bracket_kernel` (the
  two pivots between which the threshold lies), `_compact_kernel` (the values between
  them, at most `CANDIDATES`, into a small buffer) and `_resolve_kernel` (sorts those values
  in the smallest of `SORT_SIZES` + (CANDIDATES,) that holds them, and applies the exact
  rule). A bracket that holds more values (a flat distribution with a large nucleus) is
  narrowed first, in `REFINE_ROUNDS` rounds of `_refine_count_kernel` (count and mass at 16
  even splits of the bracket, over the row's slices in parallel) and
  `_refine_bracket_kernel`; a row still over the limit falls back to an exact search over
  its whole row in `_resolve_kernel` (k-ary bisection on the values' ordered bits, one
  program: slow). With both top-k and
  top-p, the candidates are the whole top-k set (top-p may cut anywhere in it). The
  drawing kernel then masks s < threshold.
- Processing (`_process_kernel`, `_bias_kernel`): banned tokens, logit_bias and
  penalties into a float32 workspace, as vLLM orders them; `_update_counts_kernel` adds
  the sampled tokens to the state's output counts.
- Logprobs (`_logprob_partial_kernel`, `_logprob_merge_kernel`): log-sum-exp, rank and
  top-N per row slice, then merged; rows that asked for none exit at once.
"""
from __future__ import annotations

import os

import torch

from fullgraph.layers.launch import Launcher, cdiv, next_power_of_2
from fullgraph.layers.pdl import pdl_enabled

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:            # CPU-only installs: worker/sampler.py's torch code
    triton = None

GUMBEL_MAX = 16.7              # worker/sampler.py: the largest noise value, plus margin
GREEDY_EPS = 1e-5
NOISE_SHIFT = 9                # 32 - NOISE_BITS
DRAW_BLOCK = 1024
TARGET_PROGRAMS = 528          # programs to spread few rows over, enough to fill every SM
FILTER_CHUNK = 8192            # fixed per-row slices of the filter passes (batch-invariant sums)
FILTER_BLOCK = 512
NUM_PIVOTS = 16                # d_j = (j + 1)^2 / 8: 0.125 ... 32 below the row maximum
CANDIDATES = 4096              # values a row's bracket may hold for the fast resolution
SORT_SIZES = (256, 1024)       # smaller blocks the resolution sorts when the candidates fit
REFINE_ROUNDS = 3              # parallel narrowings of a bracket that holds more
LOGPROB_BLOCK = 4096
FLAG_PENALTY, FLAG_BANNED, FLAG_BIAS, FLAG_MIN_TOKENS = 1, 2, 4, 8


def available() -> bool:
    return triton is not None


if triton is not None:
    _NP = tl.constexpr(NUM_PIVOTS)
    _CAND = tl.constexpr(CANDIDATES)
    _SORT_SMALL = tl.constexpr(SORT_SIZES[0])
    _SORT_MID = tl.constexpr(SORT_SIZES[1])
    _GMAX = tl.constexpr(GUMBEL_MAX)
    _MARGIN = tl.constexpr(2.0 ** -20)   # relative: a few float32 roundings of the bound
    _EPS = tl.constexpr(GREEDY_EPS)
    _SHIFT = tl.constexpr(NOISE_SHIFT)
    _FPEN = tl.constexpr(FLAG_PENALTY)
    _FBAN = tl.constexpr(FLAG_BANNED)
    _FBIAS = tl.constexpr(FLAG_BIAS)
    _FMIN = tl.constexpr(FLAG_MIN_TOKENS)

    # ------------------------------------------------------------------ shared pieces
    if os.environ.get("TRITON_INTERPRET", "0") == "1":     # libdevice is not interpreted
        @triton.jit
        def _log(x):
            return tl.log(x)
    else:
        @triton.jit
        def _log(x):
            """Precise (libdevice) log: the noise needs relative accuracy near 1."""
            return libdevice.log(x)

    @triton.jit
    def _pdl():
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _mix32(x):
        """x: uint32. The sampler's 32-bit mixer (worker/sampler.py `_mix32`)."""
        x = x ^ (x >> 16)
        x = x * 0x45D9F3B
        x = x ^ (x >> 16)
        x = x * 0x45D9F3B
        return x ^ (x >> 16)

    @triton.jit
    def _row_key(seed_ptr, pos_ptr, r):
        seed = tl.load(seed_ptr + r).to(tl.int64)
        pos = tl.load(pos_ptr + r).to(tl.int64)
        lo = (seed & 0xFFFFFFFF).to(tl.uint32)
        hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        p = (pos & 0xFFFFFFFF).to(tl.uint32)
        return _mix32(lo ^ _mix32(hi ^ _mix32(p)))

    @triton.jit
    def _noise_bits(h, offs):
        """The hash of (row key, vocab id): worker/sampler.py `noise_bits`."""
        golden = tl.full(offs.shape, 0x9E3779B1, tl.uint32)
        return _mix32(h + offs.to(tl.uint32) * golden)

    @triton.jit
    def _gumbel(j):
        """The noise of 23-bit draws j (uint32): decreasing in j."""
        u = (j.to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        return -_log(-_log(1.0 - u))          # 1 - u is exact

    @triton.jit
    def _scaled(x_ptr, offs, mask, t):
        """s = x / t (IEEE, as torch divides), -0.0 made +0.0 (ordered keys treat zeros as
        one value, as float comparison does); out-of-range lanes -inf."""
        x = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        return tl.div_rn(x, t) + 0.0

    @triton.jit
    def _okey(s):
        """float32 -> int32 with the same order (canonical zeros)."""
        b = s.to(tl.int32, bitcast=True)
        return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)

    @triton.jit
    def _from_okey(k):
        b = tl.where(k >= 0, k, k ^ 0x7FFFFFFF)
        return b.to(tl.float32, bitcast=True)

    @triton.jit
    def _filter_on(t, k, p, mp, V):
        return (t >= _EPS) & (((k > 0) & (k < V)) | (p < 1.0) | (mp > 0.0))

    @triton.jit
    def _cuts(k, p, V):
        """Top-k or top-p asked for: the rows the pivot pass counts (min_p alone needs only
        the row maximum)."""
        return ((k > 0) & (k < V)) | (p < 1.0)

    @triton.jit
    def _row_filtered(temp_ptr, topk_ptr, topp_ptr, minp_ptr, r, V, HAS_MIN_P: tl.constexpr):
        """(row r's temperature, whether it filters at all)."""
        t = tl.load(temp_ptr + r)
        mp = 0.0
        if HAS_MIN_P:
            mp = tl.load(minp_ptr + r)
        return t, _filter_on(t, tl.load(topk_ptr + r), tl.load(topp_ptr + r), mp, V)

    # ------------------------------------------------------------------ draw
    @triton.jit
    def _draw_kernel(x_ptr, stride_x, V, temp_ptr, seed_ptr, pos_ptr, thr_ptr,
                     key_ptr, idx_ptr, S, CHUNK,
                     DRAW: tl.constexpr, FILTER: tl.constexpr, BLOCK: tl.constexpr,
                     USE_PDL: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        if USE_PDL:
            _pdl()
        row = x_ptr + r * stride_x
        start = c * CHUNK
        end = tl.minimum(start + CHUNK, V)
        lanes = tl.arange(0, BLOCK)
        best = -float("inf")
        best_i = start
        t = tl.load(temp_ptr + r)
        draws = False
        if DRAW:
            draws = t >= _EPS
        if draws:
            h = _row_key(seed_ptr, pos_ptr, r)
            thr = -float("inf")
            if FILTER:
                thr = tl.load(thr_ptr + r)
            for off in range(start, start + CHUNK, BLOCK):
                offs = off + lanes
                x = tl.load(row + offs, mask=offs < end, other=float("-inf")).to(tl.float32)
                # a block whose best possible key is below the best so far cannot hold the
                # winner (nor tie with it), nor can one with no kept value: skip its division
                # and noise (x / t is monotone: the block's largest s is its largest x divided)
                top = tl.div_rn(tl.max(x, 0), t)
                if FILTER:
                    top = tl.where(top >= thr, top, -float("inf"))
                if (top > -float("inf")) & (top + _GMAX >= best):
                    # a tighter bound from the block's largest noise (its smallest draw; the
                    # noise is decreasing in it): most blocks stop here, before any log
                    j = _noise_bits(h, offs) >> _SHIFT
                    bound = top + _gumbel(tl.min(j, 0))
                    if bound + (tl.abs(bound) + 1.0) * _MARGIN >= best:
                        s = tl.div_rn(x, t) + 0.0
                        if FILTER:
                            s = tl.where(s >= thr, s, -float("inf"))
                        k = s + _gumbel(j)
                        m, i = tl.max(k, 0, return_indices=True,
                                      return_indices_tie_break_left=True)
                        if m > best:
                            best = m
                            best_i = off + i
        else:
            for off in range(start, start + CHUNK, BLOCK):
                offs = off + lanes
                x = tl.load(row + offs, mask=offs < end, other=float("-inf")).to(tl.float32)
                m, i = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
                if m > best:
                    best = m
                    best_i = off + i
        tl.store(key_ptr + r * S + c, best)
        tl.store(idx_ptr + r * S + c, best_i)

    _draw_launcher = Launcher(_draw_kernel)

    @triton.jit
    def _pick_kernel(key_ptr, idx_ptr, out_ptr, V, S, S_P2: tl.constexpr,
                     USE_PDL: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, S_P2)
        if USE_PDL:
            _pdl()
        m = tl.load(key_ptr + r * S + c, mask=c < S, other=-float("inf"))
        first = tl.minimum(tl.min(tl.where(m == tl.max(m, 0), c, S_P2), 0), S - 1)
        i = tl.minimum(tl.maximum(tl.load(idx_ptr + r * S + first), 0), V - 1)
        tl.store(out_ptr + r, i.to(out_ptr.dtype.element_ty))

    _pick_launcher = Launcher(_pick_kernel)

    @triton.jit
    def _noise_kernel(seed_ptr, pos_ptr, out_ptr, V, BLOCK: tl.constexpr):
        """The raw 32-bit hashes of a row (tests compare them with the torch spec)."""
        r = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        h = _row_key(seed_ptr, pos_ptr, r)
        bits = _noise_bits(h, offs)
        tl.store(out_ptr + r * V + offs, bits.to(tl.int64), mask=offs < V)

    _noise_launcher = Launcher(_noise_kernel)

    # ------------------------------------------------------------------ filter
    @triton.jit
    def _row_max_kernel(x_ptr, stride_x, V, temp_ptr, topk_ptr, topp_ptr, minp_ptr,
                        pmax_ptr, SF, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                        HAS_MIN_P: tl.constexpr, USE_PDL: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        if USE_PDL:
            _pdl()
        t, filtered = _row_filtered(temp_ptr, topk_ptr, topp_ptr, minp_ptr, r, V, HAS_MIN_P)
        if filtered:
            row = x_ptr + r * stride_x
            acc = tl.full([BLOCK], -float("inf"), tl.float32)
            for off in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
                offs = off + tl.arange(0, BLOCK)
                acc = tl.maximum(acc, _scaled(row, offs, offs < V, t))
            tl.store(pmax_ptr + r * SF + c, tl.max(acc, 0))

    _row_max_launcher = Launcher(_row_max_kernel)

    @triton.jit
    def _row_stats(pmax_ptr, r, minp_ptr, SF, SF_P2: tl.constexpr, HAS_MIN_P: tl.constexpr):
        """The row's maximum of s and the min_p cutoff (s >= cutoff survives)."""
        cs = tl.arange(0, SF_P2)
        m = tl.max(tl.load(pmax_ptr + r * SF + cs, mask=cs < SF, other=-float("inf")), 0)
        cutoff = -float("inf")
        if HAS_MIN_P:
            mp = tl.load(minp_ptr + r)
            if mp > 0.0:
                cutoff = m + _log(mp)
        return m, cutoff

    @triton.jit
    def _pivots(m):
        j = tl.arange(0, _NP).to(tl.float32)
        return m - (j + 1.0) * (j + 1.0) * 0.125

    @triton.jit
    def _pivot_kernel(x_ptr, stride_x, V, temp_ptr, topk_ptr, topp_ptr, minp_ptr,
                      pmax_ptr, pcount_ptr, pmass_ptr, SF, SF_P2: tl.constexpr,
                      CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_MIN_P: tl.constexpr,
                      USE_PDL: tl.constexpr):
        """Per slice of a row with top-k or top-p: count and mass (exp(s - max)) of survivors
        at or above each pivot, and of all survivors (entry _NP)."""
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        if USE_PDL:
            _pdl()
        t, filtered = _row_filtered(temp_ptr, topk_ptr, topp_ptr, minp_ptr, r, V, HAS_MIN_P)
        if filtered & _cuts(tl.load(topk_ptr + r), tl.load(topp_ptr + r), V):
            m, cutoff = _row_stats(pmax_ptr, r, minp_ptr, SF, SF_P2, HAS_MIN_P)
            piv = _pivots(m)
            row = x_ptr + r * stride_x
            cnt = tl.zeros([_NP], tl.int32)
            mass = tl.zeros([_NP], tl.float32)
            cnt_all = tl.zeros([BLOCK], tl.int32)
            mass_all = tl.zeros([BLOCK], tl.float32)
            for off in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
                offs = off + tl.arange(0, BLOCK)
                s = _scaled(row, offs, offs < V, t)
                valid = (s > -float("inf")) & (s >= cutoff)
                e = tl.where(valid, tl.exp(s - m), 0.0)
                above = valid[None, :] & (s[None, :] >= piv[:, None])
                cnt += tl.sum(above.to(tl.int32), 1)
                mass += tl.sum(tl.where(above, e[None, :], 0.0), 1)
                cnt_all += valid.to(tl.int32)
                mass_all += e
            j = tl.arange(0, _NP)
            base = (r * SF + c) * (_NP + 1)
            tl.store(pcount_ptr + base + j, cnt)
            tl.store(pmass_ptr + base + j, mass)
            tl.store(pcount_ptr + base + _NP, tl.sum(cnt_all, 0))
            tl.store(pmass_ptr + base + _NP, tl.sum(mass_all, 0))

    _pivot_launcher = Launcher(_pivot_kernel)

    @triton.jit
    def _bracket_kernel(V, temp_ptr, topk_ptr, topp_ptr, minp_ptr, pmax_ptr, pcount_ptr,
                        pmass_ptr, info_f_ptr, info_i_ptr, counter_ptr, thr_ptr, SF,
                        SF_P2: tl.constexpr, HAS_MIN_P: tl.constexpr, USE_PDL: tl.constexpr):
        """The pivots around the threshold: lo = the highest pivot that is surely below it
        (the k-th largest value, or the top-p boundary, is >= lo), hi = the pivot above
        (+inf if none); values in [lo, hi) are the candidates. Mode 0: no top-k/top-p
        (threshold = min_p's cutoff), 1: candidates fit the buffer, 2: they do not."""
        r = tl.program_id(0).to(tl.int64)
        if USE_PDL:
            _pdl()
        t = tl.load(temp_ptr + r)
        k = tl.load(topk_ptr + r)
        p = tl.load(topp_ptr + r)
        mp = 0.0
        if HAS_MIN_P:
            mp = tl.load(minp_ptr + r)
        tl.store(counter_ptr + r, 0)
        if _filter_on(t, k, p, mp, V) & _cuts(k, p, V):
            m, cutoff = _row_stats(pmax_ptr, r, minp_ptr, SF, SF_P2, HAS_MIN_P)
            piv = _pivots(m)
            cs = tl.arange(0, SF_P2)
            j = tl.arange(0, _NP)
            base = (r * SF + cs) * (_NP + 1)
            cm = cs < SF
            cnt = tl.sum(tl.load(pcount_ptr + base[:, None] + j[None, :], mask=cm[:, None],
                                 other=0), 0)
            mass = tl.sum(tl.load(pmass_ptr + base[:, None] + j[None, :], mask=cm[:, None],
                                  other=0.0), 0)
            n = tl.sum(tl.load(pcount_ptr + base + _NP, mask=cm, other=0), 0)
            z = tl.sum(tl.load(pmass_ptr + base + _NP, mask=cm, other=0.0), 0)
            k_on = (k > 0) & (k < n)
            p_on = p < 1.0
            if k_on | p_on:
                ok = tl.where(k_on, cnt >= k, mass >= p * z)
                js = tl.min(tl.where(ok, j, _NP), 0)        # first pivot surely below
                lo = tl.sum(tl.where(j == js, piv, 0.0), 0)
                n_lo = tl.sum(tl.where(j == js, cnt, 0), 0)
                if js == _NP:                               # below every pivot
                    lo = -float("inf")
                    n_lo = n
                hi = tl.sum(tl.where(j == js - 1, piv, 0.0), 0)
                n_hi = tl.sum(tl.where(j == js - 1, cnt, 0), 0)
                m_hi = tl.sum(tl.where(j == js - 1, mass, 0.0), 0)
                if (js == 0) | (k_on & p_on):
                    # with both, top-p may cut anywhere in the top-k set: keep all of it
                    hi = float("inf")
                    n_hi = 0
                    m_hi = 0.0
                mode = tl.where(n_lo - n_hi <= _CAND, 1, 2)
                tl.store(info_f_ptr + r * 6 + 0, m)
                tl.store(info_f_ptr + r * 6 + 1, cutoff)
                tl.store(info_f_ptr + r * 6 + 2, lo)
                tl.store(info_f_ptr + r * 6 + 3, hi)
                tl.store(info_f_ptr + r * 6 + 4, m_hi)
                tl.store(info_f_ptr + r * 6 + 5, z)
                tl.store(info_i_ptr + r * 4 + 0, mode)
                tl.store(info_i_ptr + r * 4 + 1, n_hi)
                tl.store(info_i_ptr + r * 4 + 2, n_lo - n_hi)
                tl.store(info_i_ptr + r * 4 + 3, n)
            else:
                tl.store(info_i_ptr + r * 4 + 0, 0)
                tl.store(thr_ptr + r, cutoff)
        else:
            thr = -float("inf")
            if _filter_on(t, k, p, mp, V):              # min_p alone: its cutoff
                thr = _row_stats(pmax_ptr, r, minp_ptr, SF, SF_P2, HAS_MIN_P)[1]
            tl.store(info_i_ptr + r * 4 + 0, 0)
            tl.store(thr_ptr + r, thr)

    _bracket_launcher = Launcher(_bracket_kernel)

    @triton.jit
    def _refine_splits(m, lo, hi):
        """_NP values splitting the bracket [lo, hi) evenly (lo = -inf: from m - 64; hi =
        +inf: up to m)."""
        lo = tl.where(lo > -float("inf"), lo, m - 64.0)
        hi = tl.where(hi < float("inf"), hi, _from_okey(_okey(m) + 1))
        j = tl.arange(0, _NP).to(tl.float32) + 1.0
        return lo + (hi - lo) * (j / (_NP + 1))

    @triton.jit
    def _refine_count_kernel(x_ptr, stride_x, V, temp_ptr, info_f_ptr, info_i_ptr,
                             rcount_ptr, rmass_ptr, rmin_ptr, rmax_ptr, CHUNK: tl.constexpr,
                             BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        """Mode-2 rows, per slice: count and mass of survivors at or above each split of
        the bracket, and the smallest and largest survivor inside it."""
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        SF = tl.num_programs(1)
        if USE_PDL:
            _pdl()
        if tl.load(info_i_ptr + r * 4) == 2:
            t = tl.load(temp_ptr + r)
            m = tl.load(info_f_ptr + r * 6 + 0)
            cutoff = tl.load(info_f_ptr + r * 6 + 1)
            lo = tl.load(info_f_ptr + r * 6 + 2)
            hi = tl.load(info_f_ptr + r * 6 + 3)
            split = _refine_splits(m, lo, hi)
            row = x_ptr + r * stride_x
            cnt = tl.zeros([_NP], tl.int32)
            mass = tl.zeros([_NP], tl.float32)
            c_min = tl.full([BLOCK], float("inf"), tl.float32)
            c_max = tl.full([BLOCK], -float("inf"), tl.float32)
            for off in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
                offs = off + tl.arange(0, BLOCK)
                s = _scaled(row, offs, offs < V, t)
                valid = (s > -float("inf")) & (s >= cutoff) & (s >= lo)
                if tl.max(valid.to(tl.int32), 0) > 0:
                    e = tl.where(valid, tl.exp(s - m), 0.0)
                    above = valid[None, :] & (s[None, :] >= split[:, None])
                    cnt += tl.sum(above.to(tl.int32), 1)
                    mass += tl.sum(tl.where(above, e[None, :], 0.0), 1)
                    inside = valid & (s < hi)
                    c_min = tl.minimum(c_min, tl.where(inside, s, float("inf")))
                    c_max = tl.maximum(c_max, tl.where(inside, s, -float("inf")))
            j = tl.arange(0, _NP)
            tl.store(rcount_ptr + (r * SF + c) * _NP + j, cnt)
            tl.store(rmass_ptr + (r * SF + c) * _NP + j, mass)
            tl.store(rmin_ptr + r * SF + c, tl.min(c_min, 0))
            tl.store(rmax_ptr + r * SF + c, tl.max(c_max, 0))

    _refine_count_launcher = Launcher(_refine_count_kernel)

    @triton.jit
    def _refine_bracket_kernel(V, topk_ptr, topp_ptr, info_f_ptr, info_i_ptr, rcount_ptr,
                               rmass_ptr, rmin_ptr, rmax_ptr, thr_ptr, SF,
                               SF_P2: tl.constexpr, USE_PDL: tl.constexpr):
        """Mode-2 rows: the splits around the threshold, clipped to the candidates' range,
        become the new bracket (its lower end only, with both top-k and top-p); mode 1 once
        the candidates fit, or the threshold itself (mode 0) once they are one value."""
        r = tl.program_id(0).to(tl.int64)
        if USE_PDL:
            _pdl()
        if tl.load(info_i_ptr + r * 4) == 2:
            k = tl.load(topk_ptr + r)
            p = tl.load(topp_ptr + r)
            m = tl.load(info_f_ptr + r * 6 + 0)
            lo = tl.load(info_f_ptr + r * 6 + 2)
            hi = tl.load(info_f_ptr + r * 6 + 3)
            m_hi = tl.load(info_f_ptr + r * 6 + 4)
            z = tl.load(info_f_ptr + r * 6 + 5)
            n_hi = tl.load(info_i_ptr + r * 4 + 1)
            n_lo = n_hi + tl.load(info_i_ptr + r * 4 + 2)
            n = tl.load(info_i_ptr + r * 4 + 3)
            split = _refine_splits(m, lo, hi)
            cs = tl.arange(0, SF_P2)
            cm = cs < SF
            j = tl.arange(0, _NP)
            flat = (r * SF + cs[:, None]) * _NP + j[None, :]
            cnt = tl.sum(tl.load(rcount_ptr + flat, mask=cm[:, None], other=0), 0)
            mass = tl.sum(tl.load(rmass_ptr + flat, mask=cm[:, None], other=0.0), 0)
            c_min = tl.min(tl.load(rmin_ptr + r * SF + cs, mask=cm, other=float("inf")), 0)
            c_max = tl.max(tl.load(rmax_ptr + r * SF + cs, mask=cm, other=-float("inf")), 0)
            k_on = (k > 0) & (k < n)
            ok = tl.where(k_on, cnt >= k, mass >= p * z)     # true for the lower splits
            j_lo = tl.max(tl.where(ok, j, -1), 0)            # the highest split surely below
            if j_lo >= 0:
                lo = tl.sum(tl.where(j == j_lo, split, 0.0), 0)
                n_lo = tl.sum(tl.where(j == j_lo, cnt, 0), 0)
            lo = tl.maximum(lo, c_min)                       # no candidate lies below c_min
            if (k_on & (p < 1.0)) == 0:
                j_hi = tl.min(tl.where(ok, _NP, j), 0)       # the lowest split above
                if j_hi < _NP:
                    hi = tl.sum(tl.where(j == j_hi, split, 0.0), 0)
                    n_hi = tl.sum(tl.where(j == j_hi, cnt, 0), 0)
                    m_hi = tl.sum(tl.where(j == j_hi, mass, 0.0), 0)
                hi = tl.minimum(hi, _from_okey(_okey(c_max) + 1))
            tl.store(info_f_ptr + r * 6 + 2, lo)
            tl.store(info_f_ptr + r * 6 + 3, hi)
            tl.store(info_f_ptr + r * 6 + 4, m_hi)
            tl.store(info_i_ptr + r * 4 + 1, n_hi)
            tl.store(info_i_ptr + r * 4 + 2, n_lo - n_hi)
            if c_min == c_max:           # the threshold is a candidate, and they are one value
                tl.store(info_i_ptr + r * 4, 0)
                tl.store(thr_ptr + r, c_min)
            elif n_lo - n_hi <= _CAND:
                tl.store(info_i_ptr + r * 4, 1)

    _refine_bracket_launcher = Launcher(_refine_bracket_kernel)

    @triton.jit
    def _compact_kernel(x_ptr, stride_x, V, temp_ptr, info_f_ptr, info_i_ptr, counter_ptr,
                        cand_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                        USE_PDL: tl.constexpr):
        """Mode-1 rows: survivors with lo <= s < hi into the row's candidate buffer (in any
        order: the resolution sorts them)."""
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        if USE_PDL:
            _pdl()
        if tl.load(info_i_ptr + r * 4) == 1:
            t = tl.load(temp_ptr + r)
            cutoff = tl.load(info_f_ptr + r * 6 + 1)
            lo = tl.load(info_f_ptr + r * 6 + 2)
            hi = tl.load(info_f_ptr + r * 6 + 3)
            row = x_ptr + r * stride_x
            for off in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
                offs = off + tl.arange(0, BLOCK)
                s = _scaled(row, offs, offs < V, t)
                sel = (s > -float("inf")) & (s >= cutoff) & (s >= lo) & (s < hi)
                n = tl.sum(sel.to(tl.int32), 0)
                if n > 0:
                    at = tl.atomic_add(counter_ptr + r, n) + tl.cumsum(sel.to(tl.int32), 0) - 1
                    tl.store(cand_ptr + r * _CAND + at, s,
                             mask=sel & (at < _CAND))

    _compact_launcher = Launcher(_compact_kernel)

    @triton.jit
    def _count_mass_at(row, V, t, m, cutoff, keys, BLOCK: tl.constexpr):
        """Over a whole row: count and mass of survivors whose ordered key is >= each of
        `keys` ([_NP] int64). The fallback's pass."""
        cnt = tl.zeros([_NP], tl.int32)
        mass = tl.zeros([_NP], tl.float32)
        for off in range(0, V, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            s = _scaled(row, offs, offs < V, t)
            valid = (s > -float("inf")) & (s >= cutoff)
            e = tl.where(valid, tl.exp(s - m), 0.0)
            above = valid[None, :] & (_okey(s).to(tl.int64)[None, :] >= keys[:, None])
            cnt += tl.sum(above.to(tl.int32), 1)
            mass += tl.sum(tl.where(above, e[None, :], 0.0), 1)
        return cnt, mass

    @triton.jit
    def _split_keys(lo, hi):
        """_NP int64 keys spread over the open interval (lo, hi) (lo < hi - 1)."""
        j = tl.arange(0, _NP).to(tl.int64) + 1
        return lo + tl.maximum((hi - lo) * j // (_NP + 1), 1)

    @triton.jit
    def _sorted_threshold(cand, n_c, k, p, m, m_hi, z_all, n_hi, k_on, k_off, p_off,
                          SIZE: tl.constexpr):
        """The exact rule over the row's `n_c` candidates (<= SIZE), sorted: the smallest
        value kept by top-k (the first k - n_hi) and top-p (mass above it < p * z)."""
        i = tl.arange(0, SIZE)
        s = tl.load(cand + i, mask=i < n_c, other=-float("inf"))
        s = tl.sort(s, descending=True)
        e = tl.where(i < n_c, tl.exp(s - m), 0.0)
        z = z_all
        if k_on:      # mass of the top-k set: values >= the k-th largest
            vk = tl.min(tl.where(n_hi + i < k, s, float("inf")), 0)
            z = m_hi + tl.sum(tl.where((s >= vk) & (i < n_c), e, 0.0), 0)
        above = m_hi + (tl.cumsum(e, 0) - e)
        # (int sums: the interpreter cannot OR a vector with a scalar bool)
        k_ok = ((n_hi + i < k).to(tl.int32) + k_off.to(tl.int32)) > 0
        p_ok = ((above < p * z).to(tl.int32) + p_off.to(tl.int32)) > 0
        q = (i < n_c) & k_ok & p_ok
        return tl.min(tl.where(q, s, float("inf")), 0)

    @triton.jit
    def _resolve_kernel(x_ptr, stride_x, V, temp_ptr, topk_ptr, topp_ptr, info_f_ptr,
                        info_i_ptr, cand_ptr, thr_ptr, BLOCK: tl.constexpr,
                        USE_PDL: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        if USE_PDL:
            _pdl()
        mode = tl.load(info_i_ptr + r * 4)
        if mode != 0:
            k = tl.load(topk_ptr + r)
            p = tl.load(topp_ptr + r)
            m = tl.load(info_f_ptr + r * 6 + 0)
            cutoff = tl.load(info_f_ptr + r * 6 + 1)
            hi = tl.load(info_f_ptr + r * 6 + 3)
            m_hi = tl.load(info_f_ptr + r * 6 + 4)
            z_all = tl.load(info_f_ptr + r * 6 + 5)
            n_hi = tl.load(info_i_ptr + r * 4 + 1)
            n_c = tl.load(info_i_ptr + r * 4 + 2)
            n = tl.load(info_i_ptr + r * 4 + 3)
            k_on = (k > 0) & (k < n)
            k_off = (k <= 0) | (k >= n)
            p_on = p < 1.0
            p_off = p >= 1.0
            thr = hi
            if mode == 1:
                # the smallest block that holds the candidates (a sort's cost grows with it)
                cand = cand_ptr + r * _CAND
                if n_c <= _SORT_SMALL:
                    thr = _sorted_threshold(cand, n_c, k, p, m, m_hi, z_all, n_hi, k_on,
                                            k_off, p_off, _SORT_SMALL)
                elif n_c <= _SORT_MID:
                    thr = _sorted_threshold(cand, n_c, k, p, m, m_hi, z_all, n_hi, k_on,
                                            k_off, p_off, _SORT_MID)
                else:
                    thr = _sorted_threshold(cand, n_c, k, p, m, m_hi, z_all, n_hi, k_on,
                                            k_off, p_off, _CAND)
            if mode == 2:
                thr = _search(x_ptr + r * stride_x, V, tl.load(temp_ptr + r), k, p, k_on, p_on,
                              m, cutoff, z_all, BLOCK)
            tl.store(thr_ptr + r, thr)

    _resolve_launcher = Launcher(_resolve_kernel)

    @triton.jit
    def _search(row, V, t, k, p, k_on, p_on, m, cutoff, z_all, BLOCK: tl.constexpr):
        """The exact threshold by k-ary search over ordered keys (int64 here: spans of
        int32 keys overflow int32), a whole-row pass per step (the fallback)."""
        lo = tl.full([], -2139095041, tl.int64)          # the ordered key of -inf
        if cutoff > -float("inf"):
            lo = _okey(cutoff).to(tl.int64) - 1
        z = z_all
        if k_on:
            # the k-th largest value: invariant count(key >= lo) >= k > count(key >= hi)
            hi = _okey(m).to(tl.int64) + 1
            while hi - lo > 1:
                keys = _split_keys(lo, hi)
                cnt, mass = _count_mass_at(row, V, t, m, cutoff, keys, BLOCK)
                ok = cnt >= k
                new_lo = tl.max(tl.where(ok, keys, lo), 0)
                hi = tl.min(tl.where(ok, hi, keys), 0)
                lo = new_lo
            cnt, mass = _count_mass_at(row, V, t, m, cutoff, tl.zeros([_NP], tl.int64) + lo,
                                       BLOCK)
            z = tl.max(mass, 0)          # the top-k set's mass
            lo = lo - 1                  # every top-k value lies above it
        if p_on:
            # the smallest key t with mass(key > t) < p * z: lo fails, hi passes
            hi = _okey(m).to(tl.int64)
            while hi - lo > 1:
                keys = _split_keys(lo, hi)
                cnt, mass = _count_mass_at(row, V, t, m, cutoff, keys + 1, BLOCK)
                passes = mass < p * z
                new_hi = tl.min(tl.where(passes, keys, hi), 0)
                lo = tl.max(tl.where(passes, lo, keys), 0)
                hi = new_hi
            thr = _from_okey(hi.to(tl.int32))
        else:
            thr = _from_okey((lo + 1).to(tl.int32))
        return thr

    # ------------------------------------------------------------------ processing
    @triton.jit
    def _penalized(z, count, in_prompt, rp, fp, pp, flags):
        """vLLM's order: banned (already -inf in z) -> bias (already added) -> repetition,
        frequency, presence penalties. Launched without FMA contraction, so each operation
        rounds as torch's does."""
        if (flags & _FPEN) != 0:
            seen = in_prompt | (count > 0)
            z = tl.where(seen, tl.where(z > 0, tl.div_rn(z, rp), z * rp), z)
            z = z - fp * count.to(tl.float32)
            z = z - pp * (count > 0).to(tl.float32)
        return z

    @triton.jit
    def _process_kernel(x_ptr, stride_x, out_ptr, V, slots_ptr, num_slots, flags_ptr,
                        counts_ptr, prompt_ptr, banned_ptr, W, rp_ptr, fp_ptr, pp_ptr,
                        CHUNK: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        if USE_PDL:
            _pdl()
        slot = tl.load(slots_ptr + r).to(tl.int64)
        slot = tl.where(slot >= 0, slot, num_slots)
        flags = tl.load(flags_ptr + slot)
        flags = tl.where(slot < num_slots, flags, 0)
        rp = tl.load(rp_ptr + slot)
        fp = tl.load(fp_ptr + slot)
        pp = tl.load(pp_ptr + slot)
        for off in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            inb = offs < V
            z = tl.load(x_ptr + r * stride_x + offs, mask=inb, other=0.0).to(tl.float32)
            if flags != 0:
                word = offs // 32
                bit = offs % 32
                if (flags & _FBAN) != 0:
                    banned = (tl.load(banned_ptr + slot * W + word, mask=inb, other=0) >> bit) & 1
                    z = tl.where(banned != 0, -float("inf"), z)
                if (flags & _FPEN) != 0:
                    count = tl.load(counts_ptr + slot * V + offs, mask=inb, other=0)
                    prompt = (tl.load(prompt_ptr + slot * W + word, mask=inb, other=0) >> bit) & 1
                    z = _penalized(z, count, prompt != 0, rp, fp, pp, flags)
            tl.store(out_ptr + r * V + offs, z, mask=inb)

    _process_launcher = Launcher(_process_kernel)

    @triton.jit
    def _bias_kernel(x_ptr, stride_x, out_ptr, V, slots_ptr, num_slots, flags_ptr,
                     counts_ptr, prompt_ptr, banned_ptr, W, rp_ptr, fp_ptr, pp_ptr,
                     bias_ids_ptr, bias_vals_ptr, pos_ptr, min_len_ptr, stop_ids_ptr,
                     B: tl.constexpr, NSTOP: tl.constexpr, USE_PDL: tl.constexpr):
        """The sparse part of processing, after `_process_kernel`: tokens with a logit_bias,
        recomputed from the raw logit with the bias in its place (after the ban, before the
        penalties), then min_tokens' stop tokens to -inf (which the penalties keep)."""
        r = tl.program_id(0).to(tl.int64)
        if USE_PDL:
            _pdl()
        slot = tl.load(slots_ptr + r).to(tl.int64)
        if slot >= 0:
            flags = tl.load(flags_ptr + slot)
            if (flags & _FBIAS) != 0:
                b = tl.arange(0, B)
                ids = tl.load(bias_ids_ptr + slot * B + b)
                use = (ids >= 0) & (ids < V)
                ids = tl.where(use, ids, 0)
                z = tl.load(x_ptr + r * stride_x + ids, mask=use, other=0.0).to(tl.float32)
                word = ids // 32
                bit = ids % 32
                if (flags & _FBAN) != 0:
                    banned = (tl.load(banned_ptr + slot * W + word, mask=use, other=0) >> bit) & 1
                    z = tl.where(banned != 0, -float("inf"), z)
                z = z + tl.load(bias_vals_ptr + slot * B + b, mask=use, other=0.0)
                count = tl.load(counts_ptr + slot * V + ids, mask=use, other=0)
                prompt = (tl.load(prompt_ptr + slot * W + word, mask=use, other=0) >> bit) & 1
                z = _penalized(z, count, prompt != 0, tl.load(rp_ptr + slot),
                               tl.load(fp_ptr + slot), tl.load(pp_ptr + slot), flags)
                tl.store(out_ptr + r * V + ids, z, mask=use)
            if (flags & _FMIN) != 0:
                if tl.load(pos_ptr + r) < tl.load(min_len_ptr + slot):
                    tl.debug_barrier()          # after the bias stores to the same ids
                    sid = tl.load(stop_ids_ptr + slot * NSTOP + tl.arange(0, NSTOP))
                    tl.store(out_ptr + r * V + sid, -float("inf"), mask=(sid >= 0) & (sid < V))

    _bias_launcher = Launcher(_bias_kernel)

    @triton.jit
    def _update_counts_kernel(slots_ptr, tok_ptr, counts_ptr, V, USE_PDL: tl.constexpr):
        r = tl.program_id(0)
        if USE_PDL:
            _pdl()
        slot = tl.load(slots_ptr + r).to(tl.int64)
        if slot >= 0:
            tok = tl.load(tok_ptr + r).to(tl.int64)
            tl.atomic_add(counts_ptr + slot * V + tok, 1)

    _update_counts_launcher = Launcher(_update_counts_kernel)

    # ------------------------------------------------------------------ logprobs
    @triton.jit
    def _logprob_partial_kernel(x_ptr, stride_x, V, tok_ptr, rowlp_ptr, pmax_ptr, psum_ptr,
                                prank_ptr, ptop_v_ptr, ptop_i_ptr, SL,
                                N: tl.constexpr, N_P2: tl.constexpr, BLOCK: tl.constexpr,
                                ROW_MASK: tl.constexpr, USE_PDL: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        if USE_PDL:
            _pdl()
        go = True
        if ROW_MASK:
            go = tl.load(rowlp_ptr + r) >= 0
        if go:
            offs = c * BLOCK + tl.arange(0, BLOCK)
            row = x_ptr + r * stride_x
            x = tl.load(row + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
            chosen = tl.load(row + tl.load(tok_ptr + r)).to(tl.float32)
            m = tl.max(x, 0)
            base = r * SL + c
            tl.store(pmax_ptr + base, m)
            tl.store(psum_ptr + base, tl.sum(tl.exp(x - m), 0))
            tl.store(prank_ptr + base, tl.sum((x > chosen).to(tl.int32), 0))
            n = tl.arange(0, N_P2)
            top_v = tl.full([N_P2], -float("inf"), tl.float32)
            top_i = tl.zeros([N_P2], tl.int32)
            for j in tl.static_range(N):
                v, i = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
                top_v = tl.where(n == j, v, top_v)
                top_i = tl.where(n == j, c * BLOCK + i, top_i)
                x = tl.where(offs == c * BLOCK + i, -float("inf"), x)
            tl.store(ptop_v_ptr + base * N_P2 + n, top_v)
            tl.store(ptop_i_ptr + base * N_P2 + n, top_i)

    _logprob_partial_launcher = Launcher(_logprob_partial_kernel)

    @triton.jit
    def _logprob_merge_kernel(x_ptr, stride_x, tok_ptr, rowlp_ptr, pmax_ptr, psum_ptr,
                              prank_ptr, ptop_v_ptr, ptop_i_ptr, lp_ptr, ids_ptr, rank_ptr, SL,
                              SL_P2: tl.constexpr, N: tl.constexpr, N_P2: tl.constexpr,
                              ROW_MASK: tl.constexpr, USE_PDL: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        if USE_PDL:
            _pdl()
        go = True
        if ROW_MASK:
            go = tl.load(rowlp_ptr + r) >= 0
        if go:
            cs = tl.arange(0, SL_P2)
            cm = cs < SL
            pm = tl.load(pmax_ptr + r * SL + cs, mask=cm, other=-float("inf"))
            mx = tl.max(pm, 0)
            total = tl.sum(tl.where(cm, tl.load(psum_ptr + r * SL + cs, mask=cm, other=0.0)
                                    * tl.exp(pm - mx), 0.0), 0)
            lse = mx + _log(total)
            tok = tl.load(tok_ptr + r)
            chosen = tl.load(x_ptr + r * stride_x + tok).to(tl.float32)
            rank = tl.sum(tl.load(prank_ptr + r * SL + cs, mask=cm, other=0), 0) + 1
            tl.store(rank_ptr + r, rank.to(rank_ptr.dtype.element_ty))
            tl.store(lp_ptr + r * (N + 1), chosen - lse)
            tl.store(ids_ptr + r * (N + 1), tok.to(ids_ptr.dtype.element_ty))
            n = tl.arange(0, N_P2)
            flat = (r * SL + cs[:, None]) * N_P2 + n[None, :]
            fm = cm[:, None] & (n[None, :] < N)
            v = tl.load(ptop_v_ptr + flat, mask=fm, other=-float("inf"))
            ids = tl.load(ptop_i_ptr + flat, mask=fm, other=0x7FFFFFFF)
            ids = tl.where(fm, ids, 0x7FFFFFFF)
            for j in tl.static_range(N):
                best = tl.max(tl.max(v, 1), 0)
                bid = tl.min(tl.min(tl.where(v == best, ids, 0x7FFFFFFF), 1), 0)
                tl.store(lp_ptr + r * (N + 1) + 1 + j, best - lse)
                tl.store(ids_ptr + r * (N + 1) + 1 + j, bid.to(ids_ptr.dtype.element_ty))
                v = tl.where(ids == bid, -float("inf"), v)
                ids = tl.where(ids == bid, 0x7FFFFFFF, ids)

    _logprob_merge_launcher = Launcher(_logprob_merge_kernel)


# ---------------------------------------------------------------------------------- launchers
def _use_pdl(x: torch.Tensor) -> bool:
    return x.is_cuda and pdl_enabled(x)


def _launch(launcher: Launcher, grid, *args, pdl: bool, num_warps: int = 4, **meta) -> None:
    extra = {"launch_pdl": True} if pdl else {}
    launcher[grid](*args, USE_PDL=pdl, num_warps=num_warps, **meta, **extra)


def draw_slices(rows: int, vocab: int) -> tuple[int, int]:
    """(slices per row, elements per slice) of the drawing pass: ~TARGET_PROGRAMS programs
    in all, whole blocks per slice. The token does not depend on it (an exact argmax)."""
    blocks = cdiv(vocab, DRAW_BLOCK)
    per_row = max(1, min(blocks, cdiv(TARGET_PROGRAMS, max(rows, 1))))
    chunk = cdiv(blocks, per_row) * DRAW_BLOCK
    return cdiv(vocab, chunk), chunk


def draw(x: torch.Tensor, temperature, seeds, positions, thr, out: torch.Tensor,
         draw_rows: bool = True) -> torch.Tensor:
    """out[r] = argmax of x[r] / T + Gumbel noise over x[r] / T >= thr[r] (thr None: all),
    or of x[r] for greedy rows."""
    rows, vocab = x.shape
    s, chunk = draw_slices(rows, vocab)
    keys = torch.empty(rows, s, dtype=torch.float32, device=x.device)
    idx = torch.empty(rows, s, dtype=torch.int32, device=x.device)
    pdl = _use_pdl(x)
    _launch(_draw_launcher, (rows, s), x, x.stride(0), vocab, temperature, seeds, positions,
            thr if thr is not None else temperature, keys, idx, s, chunk, pdl=pdl,
            DRAW=draw_rows, FILTER=thr is not None, BLOCK=DRAW_BLOCK)
    _launch(_pick_launcher, (rows,), keys, idx, out, vocab, s, pdl=pdl,
            S_P2=next_power_of_2(s))
    return out


def noise_bits(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    out = torch.empty(seeds.shape[0], vocab, dtype=torch.int64, device=seeds.device)
    _noise_launcher[(seeds.shape[0], cdiv(vocab, 1024))](seeds, positions, out, vocab,
                                                                BLOCK=1024)
    return out


def filter_thresholds(x: torch.Tensor, temperature, top_k, top_p, min_p) -> torch.Tensor:
    """[R] float32: the kept set of row r is {x[r] / T >= thr[r]} (worker/sampler.py's
    `filter_thresholds`); rows without a filter get -inf."""
    rows, vocab = x.shape
    dev = x.device
    sf = cdiv(vocab, FILTER_CHUNK)
    sf_p2 = next_power_of_2(sf)
    has_min_p = min_p is not None
    min_p = min_p if has_min_p else temperature
    pmax = torch.empty(rows, sf, dtype=torch.float32, device=dev)
    pcount = torch.empty(rows, sf, NUM_PIVOTS + 1, dtype=torch.int32, device=dev)
    pmass = torch.empty(rows, sf, NUM_PIVOTS + 1, dtype=torch.float32, device=dev)
    info_f = torch.empty(rows, 6, dtype=torch.float32, device=dev)
    info_i = torch.empty(rows, 4, dtype=torch.int32, device=dev)
    counter = torch.empty(rows, dtype=torch.int32, device=dev)
    cand = torch.empty(rows, CANDIDATES, dtype=torch.float32, device=dev)
    thr = torch.empty(rows, dtype=torch.float32, device=dev)
    pdl = _use_pdl(x)
    common = (x, x.stride(0), vocab, temperature)
    _launch(_row_max_launcher, (rows, sf), *common, top_k, top_p, min_p, pmax, sf, pdl=pdl,
            CHUNK=FILTER_CHUNK, BLOCK=2048, HAS_MIN_P=has_min_p)
    _launch(_pivot_launcher, (rows, sf), *common, top_k, top_p, min_p, pmax, pcount, pmass, sf,
            pdl=pdl, SF_P2=sf_p2, CHUNK=FILTER_CHUNK, BLOCK=FILTER_BLOCK, HAS_MIN_P=has_min_p)
    _launch(_bracket_launcher, (rows,), vocab, temperature, top_k, top_p, min_p, pmax, pcount,
            pmass, info_f, info_i, counter, thr, sf, pdl=pdl, SF_P2=sf_p2,
            HAS_MIN_P=has_min_p)
    rcount = torch.empty(rows, sf, NUM_PIVOTS, dtype=torch.int32, device=dev)
    rmass = torch.empty(rows, sf, NUM_PIVOTS, dtype=torch.float32, device=dev)
    rmin = torch.empty(rows, sf, dtype=torch.float32, device=dev)
    rmax = torch.empty_like(rmin)
    for _ in range(REFINE_ROUNDS):
        _launch(_refine_count_launcher, (rows, sf), *common, info_f, info_i, rcount, rmass,
                rmin, rmax, pdl=pdl, CHUNK=FILTER_CHUNK, BLOCK=FILTER_BLOCK)
        _launch(_refine_bracket_launcher, (rows,), vocab, top_k, top_p, info_f, info_i, rcount,
                rmass, rmin, rmax, thr, sf, pdl=pdl, SF_P2=sf_p2)
    _launch(_compact_launcher, (rows, sf), *common, info_f, info_i, counter, cand, pdl=pdl,
            CHUNK=FILTER_CHUNK, BLOCK=2048)
    _launch(_resolve_launcher, (rows,), *common, top_k, top_p, info_f, info_i, cand, thr,
            pdl=pdl, BLOCK=FILTER_BLOCK, num_warps=8)
    return thr


def process(x: torch.Tensor, state, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[R, V] float32 processed logits (worker/sampler.py's `process_logits`)."""
    rows, vocab = x.shape
    out = torch.empty(rows, vocab, dtype=torch.float32, device=x.device)
    pdl = _use_pdl(x)
    w = state.prompt_mask.shape[1]
    args = (x, x.stride(0), out, vocab, slots, state.num_slots, state.flags,
            state.output_counts, state.prompt_mask, state.banned_mask, w,
            state.repetition_penalty, state.frequency_penalty, state.presence_penalty)
    chunk = 8192
    _launch(_process_launcher, (rows, cdiv(vocab, chunk)), *args, pdl=pdl, CHUNK=chunk,
            BLOCK=1024, enable_fp_fusion=False)
    b = state.bias_ids.shape[1]
    assert b == next_power_of_2(b), "logit_bias capacity must be a power of two"
    nstop = state.stop_ids.shape[1]
    assert nstop == next_power_of_2(nstop), "stop-id capacity must be a power of two"
    _launch(_bias_launcher, (rows,), *args, state.bias_ids, state.bias_values, positions,
            state.min_len, state.stop_ids, pdl=pdl, B=b, NSTOP=nstop, enable_fp_fusion=False)
    return out


def update_counts(state, slots: torch.Tensor, token_ids: torch.Tensor) -> None:
    _launch(_update_counts_launcher, (slots.shape[0],), slots, token_ids, state.output_counts,
            state.vocab_size, pdl=_use_pdl(token_ids), num_warps=1)


def logprobs(x: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int,
             row_logprobs: torch.Tensor | None):
    """([R, 1 + N] logprobs, ids, [R] ranks) of raw logits, as worker/sampler.py's
    `compute_logprobs`; rows with row_logprobs < 0 are skipped (left unspecified)."""
    rows, vocab = x.shape
    dev = x.device
    n = max(num_logprobs, 0)
    n_p2 = max(next_power_of_2(max(n, 1)), 2)
    sl = cdiv(vocab, LOGPROB_BLOCK)
    pmax = torch.empty(rows, sl, dtype=torch.float32, device=dev)
    psum = torch.empty_like(pmax)
    prank = torch.empty(rows, sl, dtype=torch.int32, device=dev)
    ptop_v = torch.empty(rows, sl, n_p2, dtype=torch.float32, device=dev)
    ptop_i = torch.empty(rows, sl, n_p2, dtype=torch.int32, device=dev)
    lp = torch.zeros(rows, n + 1, dtype=torch.float32, device=dev)
    ids = torch.zeros(rows, n + 1, dtype=torch.int64, device=dev)
    ranks = torch.zeros(rows, dtype=torch.int64, device=dev)
    pdl = _use_pdl(x)
    mask = row_logprobs is not None
    rowlp = row_logprobs if mask else token_ids
    _launch(_logprob_partial_launcher, (rows, sl), x, x.stride(0), vocab, token_ids, rowlp, pmax,
            psum, prank, ptop_v, ptop_i, sl, pdl=pdl, N=n, N_P2=n_p2, BLOCK=LOGPROB_BLOCK,
            ROW_MASK=mask, num_warps=8)
    _launch(_logprob_merge_launcher, (rows,), x, x.stride(0), token_ids, rowlp, pmax, psum, prank,
            ptop_v, ptop_i, lp, ids, ranks, sl, pdl=pdl, SL_P2=next_power_of_2(sl), N=n,
            N_P2=n_p2, ROW_MASK=mask)
    return lp, ids, ranks


def sample(logits: torch.Tensor, t, features, state
           ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """worker/sampler.py's `sample` on CUDA: the chain of kernels for `features` (`t` its
    SamplingTensors); (token ids, (logprobs, their token ids, ranks) or None)."""
    x = logits
    if features.process:
        x = process(logits, state, t.state_slots, t.positions)
    thr = None
    if features.sample and features.filter:
        thr = filter_thresholds(x, t.temperature, t.top_k, t.top_p, t.min_p)
    tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    draw(x, t.temperature, t.seeds, t.positions, thr, tokens, draw_rows=features.sample)
    lp = None
    if features.logprobs and t.num_logprobs >= 0:
        lp = logprobs(logits, tokens, t.num_logprobs, t.row_logprobs)
    if features.process:
        update_counts(state, t.state_slots, tokens)
    return tokens, lp
