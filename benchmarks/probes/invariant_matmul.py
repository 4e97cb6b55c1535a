"""Probe (docs/batch_invariance.md, section 9, probe 1): the batch-invariant matmul
(layers/invariant_gemm.py) on Qwen3-0.6B's shapes.

1. Bits: is a row's result the same under other tile shapes (BLOCK_M, BLOCK_N, BLOCK_K,
   warps, stages) at 257 rows? If a knob leaves the bits alone, the mode may choose it by
   row count (`invariant_gemm.tiles`).
2. Time: the mode's kernel against today's GEMV (layers/gemv.py, <= 32 rows) and cuBLAS, at
   1-8192 rows, graph-replayed over weight copies (>= 200 MB, so HBM is timed, not L2).

    python benchmarks/probes/invariant_matmul.py --rows 1 8 32 128 512 2048 8192

3. `--sweep-rows 1 16 32 128 512 8192`: instead, per projection and row count, the fastest
   few of a grid of tiles (up to 32 rows few-row strips: BLOCK_N, BLOCK_K, warps, stages at
   `tiles(m, k)`'s BLOCK_M; up to 256 rows narrower tiles, which give o_proj's and down's
   N = 1024 more programs than 64 x 64 does; above, GEMM tiles) against `tiles(m, k)`'s
   own, each checked to give the reference tile's bits.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gemv import SHAPES, timed  # noqa: E402  (this folder, sys.path[0] when run)

from fullgraph.layers.gemv import matmul  # noqa: E402
from fullgraph.layers.invariant_gemm import invariant_mm, tiles  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), each against 64 x 64 x 64 with 4 warps, 3 stages
VARIANTS = [(16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (128, 64, 64, 4, 3), (64, 32, 64, 4, 3),
            (64, 128, 64, 4, 3), (64, 64, 32, 4, 3), (64, 64, 128, 4, 3), (64, 64, 64, 8, 3),
            (64, 64, 64, 4, 2), (64, 64, 64, 4, 4), (128, 128, 64, 8, 3), (16, 32, 128, 4, 3),
            (16, 64, 256, 4, 2), (128, 256, 64, 8, 3)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128, 512, 2048, 8192])
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep-rows", type=int, nargs="*", default=[])
    args = ap.parse_args()
    if args.sweep_rows:
        sweep(args.sweep_rows)
        return
    torch.manual_seed(0)
    report: dict = {"bits": {}, "us": {}}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 32
        x = torch.randn(257, k, device="cuda", dtype=torch.bfloat16)
        ref = invariant_mm(x, w, tile_shape=(64, 64, 64, 4, 3))
        same = {}
        for bm, bn, bk, warps, stages in VARIANTS:
            got = invariant_mm(x, w, tile_shape=(bm, bn, bk, warps, stages))
            same[f"{bm}x{bn}x{bk} w{warps} s{stages}"] = bool(torch.equal(got, ref))
        same["cublas"] = bool(torch.equal(F.linear(x, w), ref))
        report["bits"][name] = same
        print(name, "bits equal:", same, flush=True)
        copies = max(2, (200 << 20) // (2 * n * k))
        ws = [w.clone() for _ in range(copies)]
        for m in args.rows:
            xm = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_inv = timed(lambda ww: invariant_mm(xm, ww), ws)
            t_norm = timed(lambda ww: matmul(xm, ww), ws)
            report["us"][f"{name} m={m}"] = {"invariant": t_inv, "normal": t_norm}
            print(f"{name:8s} m={m:5d} {tiles(m, k)} invariant {t_inv:9.1f} µs  "
                  f"normal {t_norm:9.1f} µs ({t_inv / t_norm:.2f}x)", flush=True)
        del ws
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


# the sweep's tiles: (BLOCK_N, BLOCK_K, warps, stages) at `tiles(m, k)`'s BLOCK_M up to 32
# rows, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) above: up to 256 rows, then GEMM tiles
FEW_ROW_GRID = list(itertools.product((16, 32), (128, 256, 512, 1024), (2, 4, 8), (2, 3)))
MID_GRID = list(itertools.product((32, 64), (16, 32, 64), (64, 128, 256), (4,), (3, 4)))
GEMM_GRID = list(itertools.product((64, 128), (128, 256), (64, 128), (4, 8), (3, 4)))


def sweep(rows: list[int], top: int = 3) -> None:
    """Tiles by time, per projection and row count (bits checked against 64^3): few-row
    strips up to 32 rows, narrower tiles up to 256, GEMM tiles above."""
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 32
        copies = max(2, (200 << 20) // (2 * n * k))
        ws = [w.clone() for _ in range(copies)]
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = invariant_mm(x, w, tile_shape=(64, 64, 64, 4, 3))
            shapes = ([(tiles(m, k)[0], *g) for g in FEW_ROW_GRID] if m <= 32
                      else MID_GRID if m <= 256 else GEMM_GRID)
            times, differ = {}, []
            for shape in shapes:
                try:
                    if not torch.equal(invariant_mm(x, w, tile_shape=shape), ref):
                        differ.append(shape)
                    times[shape] = timed(lambda ww, sh=shape: invariant_mm(x, ww, tile_shape=sh),
                                         ws)
                except Exception:   # out of shared memory or registers: not a candidate
                    continue
            now = timed(lambda ww: invariant_mm(x, ww), ws)
            best = sorted(times.items(), key=lambda kv: kv[1])[:top]
            print(f"{name:8s} m={m:3d} tiles(m, k) {tiles(m, k)} {now:7.1f} µs; fastest: "
                  + ", ".join(f"{sh} {us:.1f}" for sh, us in best)
                  + (f"; bits differ at {differ}" if differ else "; bits equal"), flush=True)
        del ws


if __name__ == "__main__":
    main()
