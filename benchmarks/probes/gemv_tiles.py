"""Probe: the GEMV kernel's tile choices at one row (layers/gemv.py), per Qwen3-0.6B shape,
graph-replayed over >= 200 MB of weight copies. Prints µs per call for each (BLOCK_N,
BLOCK_K, warps).

    python benchmarks/probes/gemv_tiles.py
"""
from __future__ import annotations

import itertools

import torch
import triton

from benchmarks.probes.gemv import SHAPES, timed
from fullgraph.layers.gemv import _gemv_kernel


def main() -> None:
    for name, (n, k) in SHAPES.items():
        if name == "lm_head":
            continue
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        copies = [w] + [w.clone() for _ in range(max(1, -(-200_000_000 // w.nbytes)) - 1)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        res = []
        for bn, bk, warps in itertools.product((1, 2, 4, 8), (256, 512, 1024), (1, 2, 4, 8)):
            def f(wt, bn=bn, bk=bk, warps=warps):
                _gemv_kernel[(triton.cdiv(n, bn),)](x, wt, out, 1, n, k, x.stride(0), wt.stride(0),
                                                   out.stride(0), M_BUCKET=1, BLOCK_N=bn,
                                                   BLOCK_K=bk, num_warps=warps)
            res.append((timed(f, copies), bn, bk, warps))
        res.sort()
        print(name, n, k, "best:", [(round(t, 2), bn, bk, wp) for t, bn, bk, wp in res[:4]],
              "current rule (4, 512, 4):", [round(t, 2) for t, bn, bk, wp in res
                                            if (bn, bk, wp) == (4, 512, 4)], flush=True)


if __name__ == "__main__":
    main()
