"""Probe: the GEMV kernel's tile choices (layers/gemv.py) per Qwen3-0.6B shape and row
count, graph-replayed over >= 200 MB of weight copies, against cuBLAS. Prints the best
(µs, BLOCK_N, BLOCK_K, warps) and cuBLAS's µs.

    python benchmarks/probes/gemv_tiles.py --rows 1 16
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton

from benchmarks.probes.gemv import SHAPES, timed
from fullgraph.layers.gemv import _gemv_kernel


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[1])
    a = p.parse_args()
    for name, (n, k) in SHAPES.items():
        if name == "lm_head":
            continue
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        copies = [w] + [w.clone() for _ in range(max(1, -(-200_000_000 // w.nbytes)) - 1)]
        for m in a.rows:
            bucket = 1 if m == 1 else 16
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            tiles = ((1, 2, 4, 8), (256, 512, 1024), (1, 2, 4, 8)) if m == 1 else \
                ((16, 32, 64), (64, 128, 256), (2, 4, 8))
            res = []
            for bn, bk, warps in itertools.product(*tiles):
                def f(wt, bn=bn, bk=bk, warps=warps):
                    _gemv_kernel[(triton.cdiv(n, bn),)](
                        x, wt, out, m, n, k, x.stride(0), wt.stride(0), out.stride(0),
                        M_BUCKET=bucket, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
                try:
                    res.append((timed(f, copies), bn, bk, warps))
                except Exception:        # e.g. out of shared memory for big tiles
                    pass
            res.sort()
            cublas = timed(lambda wt: F.linear(x, wt), copies)
            print(name, n, k, "rows", m, "cuBLAS", round(cublas, 2), "best:",
                  [(round(t, 2), bn, bk, wp) for t, bn, bk, wp in res[:3]], flush=True)


if __name__ == "__main__":
    main()
