"""The triton backend's prefill attention (attention/triton_attn.py: the kernel of
attention/paged_invariant.py at prefill tiles, one pass over the KV) on whole-prompt steps:
µs a call (graph replay) and TFLOP/s by query tokens a program, KV tile, warps and stages,
against SDPA's causal kernel on the same tokens in a contiguous layout, the KV heads
repeated (the speed a dense, unpaged kernel reaches; its output is the reference every
variant is checked against). Qwen3-0.6B's attention shape (16 query heads, 8 KV heads, head dim 128),
bf16, the engine's 32-token pages in a shuffled order.

    python benchmarks/probes/prefill_attention.py [--steps 16x512 1x4096] [--qtok 32 64]
        [--tiles 32 64 128] [--warps 4 8] [--stages 1 2 3]
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from fullgraph.attention import triton_attn
from fullgraph.attention.paged_invariant import tile_map, tiled_attention
from graph_timing import replay_ms

HQ, HKV, D, PAGE = 16, 8, 128, 32


def causal_flop(reqs: int, length: int) -> float:
    """Two matmuls over the causal half of each request's L x L scores, every query head."""
    return 4.0 * reqs * HQ * D * length * (length + 1) / 2


def step(reqs: int, length: int, dev: torch.device):
    """A prefill step of `reqs` prompts of `length` tokens: q [T, HQ, D], the paged caches
    holding the step's K/V, the step's inputs, and SDPA's output in the same token order."""
    g = torch.Generator(device=dev).manual_seed(0)
    pages = -(-length // PAGE)
    t = reqs * length
    q, k, v = (torch.randn(t, h, D, device=dev, generator=g, dtype=torch.bfloat16)
               for h in (HQ, HKV, HKV))
    table = (torch.randperm(reqs * pages, device=dev, generator=g) + 1).int().view(reqs, pages)
    pos = torch.arange(length, device=dev).repeat(reqs)
    req = torch.arange(reqs, device=dev).repeat_interleave(length)
    slot = table[req, pos // PAGE].long() * PAGE + pos % PAGE
    k_cache = torch.zeros((reqs * pages + 1) * PAGE, HKV, D, device=dev, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    k_cache[slot], v_cache[slot] = k, v
    seq_lens = torch.full((reqs,), length, dtype=torch.int32, device=dev)
    qsl = torch.arange(0, t + 1, length, dtype=torch.int32, device=dev)

    def dense(x):                      # [T, H, D] -> [reqs, HQ, length, D], KV heads repeated
        x = x.view(reqs, length, -1, D).transpose(1, 2)
        return x.repeat_interleave(HQ // x.shape[1], dim=1).contiguous()
    qd, kd, vd = dense(q), dense(k), dense(v)

    def sdpa():
        o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
        return o.transpose(1, 2).reshape(t, HQ, D)
    return q, k_cache, v_cache, table, seq_lens, pos, qsl, sdpa


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", nargs="+", default=["16x512", "1x4096"],
                    help="requests x prompt tokens")
    ap.add_argument("--qtok", type=int, nargs="+", default=[32, 64],
                    help="query tokens a program (x the GQA group: its rows)")
    ap.add_argument("--tiles", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    dev = torch.device("cuda")
    group = HQ // HKV
    print(f"{torch.cuda.get_device_name()}; the backend's tiles: "
          f"{triton_attn.PREFILL_ROWS // group} query tokens, {triton_attn.PREFILL_TILE}-token "
          f"KV tiles, {triton_attn.prefill_warps(D)} warps, 2 stages", flush=True)
    for spec in args.steps:
        reqs, length = (int(x) for x in spec.split("x"))
        q, k_cache, v_cache, table, seq_lens, pos, qsl, sdpa = step(reqs, length, dev)
        flop = causal_flop(reqs, length)
        ref = sdpa()
        us = replay_ms(sdpa, args.iters) * 1e3
        print(json.dumps({"step": spec, "kernel": "sdpa", "us": round(us, 1),
                          "tflops": round(flop / us / 1e6, 1)}), flush=True)
        rows = []
        for qtok, tile, warps, stages in itertools.product(args.qtok, args.tiles, args.warps,
                                                           args.stages):
            tiles = tile_map(qsl, reqs, reqs * length, qtok)

            def call(qtok=qtok, tile=tile, warps=warps, stages=stages, tiles=tiles):
                return tiled_attention(q, k_cache, v_cache, table, seq_lens, pos, tiles, PAGE,
                                       D ** -0.5, qtok, tile, 0, warps, stages)
            try:
                err = (call().float() - ref.float()).abs().max().item()
                us = replay_ms(call, args.iters) * 1e3
            except Exception as e:     # out of shared memory or registers: not a candidate
                print(f"{spec} qtok {qtok} tile {tile} warps {warps} stages {stages}: "
                      f"{type(e).__name__}", flush=True)
                continue
            rows.append({"step": spec, "qtok": qtok, "tile": tile, "warps": warps,
                         "stages": stages, "us": round(us, 1),
                         "tflops": round(flop / us / 1e6, 1), "max_err": round(err, 4)})
            print(json.dumps(rows[-1]), flush=True)
        for row in sorted(rows, key=lambda r: r["us"])[:5]:
            print("fastest:", json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
