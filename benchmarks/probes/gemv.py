"""Probe: skinny bf16 matmuls of Qwen3-0.6B's shapes, cuBLAS (F.linear) vs fullgraph's
Triton kernel (layers/gemv.py), graph-replayed. Prints µs per call, GB/s, max error.
Each captured call reads a different copy of the weight (>= 200 MB in all), as a model's
layers do: one weight re-read from the 50 MB L2 would time the cache, not HBM.

    python benchmarks/probes/gemv.py --rows 1 2 4 8 16
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from fullgraph.layers.gemv import gemv

SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024),
          "down": (1024, 3072), "lm_head": (151936, 1024)}


def timed(fn, weights, reps: int = 20) -> float:
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn(weights[0])
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    calls = len(weights)
    with torch.cuda.graph(g):
        for w in weights:
            fn(w)
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / (calls * reps)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--json")
    a = p.parse_args()
    rows = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        copies = [w] + [w.clone() for _ in range(max(1, -(-200_000_000 // w.nbytes)) - 1)]
        for m in a.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w.float().t()
            err = (gemv(x, w).float() - ref).abs().max().item()
            err_cublas = (F.linear(x, w).float() - ref).abs().max().item()
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            t_cublas = timed(lambda w: F.linear(x, w), copies)
            t_ours = timed(lambda w: gemv(x, w, out), copies)
            gb = n * k * 2 / 1e9
            r = dict(shape=name, m=m, n=n, k=k, cublas_us=round(t_cublas, 2),
                     triton_us=round(t_ours, 2), cublas_GBps=round(gb / t_cublas * 1e6),
                     triton_GBps=round(gb / t_ours * 1e6), max_err=err, max_err_cublas=err_cublas)
            rows.append(r)
            print(json.dumps(r), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
