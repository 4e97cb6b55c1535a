"""Probe: the GEMV kernel's tile choices (layers/gemv.py) per Qwen3-0.6B shape and row
count, graph-replayed over >= 200 MB of weight copies, against cuBLAS. Prints the best
(µs, BLOCK_N, BLOCK_K, warps) and cuBLAS's µs.

With --prologue the kernel also does the elementwise op before the projection (RMSNorm with
the residual add for qkv / gate_up, SiLU-and-mul for down), and the probe prints what the
unfused pair costs: the plain kernel with the shipped tiles after a separate row kernel.

    python benchmarks/probes/gemv_tiles.py --rows 1 16 [--prologue] [--pdl]
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton

from benchmarks.probes.gemv import SHAPES, timed
from fullgraph.layers.fused_linear import _silu_mul_rows_kernel
from fullgraph.layers.norm import _add_rms_norm_rows_kernel
from fullgraph.layers.gemv import PLAIN, RMS_NORM, SILU_MUL, _gemv_kernel, row_bucket
from fullgraph.layers.gemv import tiles as shipped_tiles


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[1])
    p.add_argument("--prologue", action="store_true")
    p.add_argument("--pdl", action="store_true", help="launch with programmatic dependent "
                   "launch (layers/pdl.py): back-to-back calls overlap")
    a = p.parse_args()
    for name, (n, k) in SHAPES.items():
        if name in ("lm_head", "o") or (a.prologue and name == "o"):
            continue
        prologue = (SILU_MUL if name == "down" else RMS_NORM) if a.prologue else PLAIN
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        copies = [w] + [w.clone() for _ in range(max(1, -(-200_000_000 // w.nbytes)) - 1)]
        for m in a.rows:
            bucket = row_bucket(m)
            x = torch.randn(m, 2 * k if prologue == SILU_MUL else k, device="cuda",
                            dtype=torch.bfloat16)
            r, h = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
            nw = torch.ones(k, device="cuda", dtype=torch.bfloat16)
            act = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            tiles = ((1, 2, 4, 8, 16, 32), (256, 512, 1024), (2, 4, 8)) if m == 1 else \
                ((16, 32, 64), (64, 128, 256), (2, 4, 8))

            def launch(wt, xx, pro, bn, bk, warps):
                _gemv_kernel[(triton.cdiv(n, bn),)](
                    xx, wt, out, r, h, nw, wt, 0, wt, 0, m, n, k, xx.stride(0), wt.stride(0),
                    out.stride(0), r.stride(0), h.stride(0), 1e-6, PROLOGUE=pro, HAS_RES=True,
                    M_BUCKET=bucket, BLOCK_N=bn, BLOCK_K=bk, NUM_L2=0, L2_LINES=32 * warps,
                    ONE_SLICE=bk >= k, USE_PDL=a.pdl, num_warps=warps, launch_pdl=a.pdl)

            res = []
            for bn, bk, warps in itertools.product(*tiles):
                try:
                    t = timed(lambda wt, c=(bn, bk, warps): launch(wt, x, prologue, *c), copies)
                    res.append((t, bn, bk, warps))
                except Exception:        # e.g. out of shared memory for big tiles
                    pass
            res.sort()
            line = [name, n, k, "rows", m, "best:", [(round(t, 2), bn, bk, wp) for t, bn, bk, wp in res[:3]]]
            if prologue != PLAIN:
                def unfused(wt):
                    if prologue == SILU_MUL:
                        _silu_mul_rows_kernel[(m, triton.cdiv(k, 1024))](x, act, k, x.stride(0), act.stride(0), BLOCK=1024, USE_PDL=False)
                    else:
                        _add_rms_norm_rows_kernel[(m,)](x, r, h, act, nw, k, x.stride(0), r.stride(0), h.stride(0), act.stride(0), 1e-6, HAS_RES=True, BLOCK=triton.next_power_of_2(k), USE_PDL=False)
                    launch(wt, act, PLAIN, *shipped_tiles(bucket, n, k))
                line += ["unfused (row kernel + shipped tiles)", round(timed(unfused, copies), 2)]
            else:
                line += ["cuBLAS", round(timed(lambda wt: F.linear(x, wt), copies), 2)]
            print(*line, flush=True)


if __name__ == "__main__":
    main()
