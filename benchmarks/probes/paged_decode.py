"""Probe: the Triton paged decode kernel (attention/paged_decode.py), one layer of Qwen3-0.6B
shapes, graph-replayed, against the KV-read floor.

    python benchmarks/probes/paged_decode.py --ctx 640 --batches 1 8 32 128 --splits 1 2 4 8 16 32

`--heads 8 2 256`: query heads, KV heads and head dim of another model (these: the gated
attention layers of Qwen3.5-0.8B).

`--evict-l2`: between calls the graph overwrites a buffer twice the L2's size, so the KV
comes from HBM as in the engine (where 27 other layers run in between); the time of those
overwrites, replayed alone, is subtracted.
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

import fullgraph.attention.paged_decode as pd
from flex_decode import copy_bw
from gemv import timed

HQ, HKV, D = 16, 8, 128                # Qwen3-0.6B's; --heads changes them


def run(batch: int, ctx: int, bs: int, splits: int, bw: float, evict_l2: bool = False) -> dict:
    pages = -(-ctx // bs)
    nb = batch * pages + 1
    k = torch.randn(nb * bs, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    table = (torch.randperm(nb - 1, device="cuda")[:batch * pages] + 1).int().view(batch, pages)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    ws = pd.PagedDecodeWorkspace(batch, HKV, HQ // HKV, batch * HKV * splits, D, q.device)
    out = torch.empty_like(q)
    pd.paged_decode(q, k, v, table, lens, bs, 1, splits, D ** -0.5, ws, out)
    scratch = torch.empty(2 * torch.cuda.get_device_properties(0).L2_cache_size,
                          dtype=torch.uint8, device="cuda") if evict_l2 else None

    def call():
        if scratch is not None:
            scratch.fill_(1)
        pd.paged_decode(q, k, v, table, lens, bs, 1, splits, D ** -0.5, ws, out)

    calls = [None] * 20                     # timed() replays one graph of 20 calls
    us = timed(lambda _: call(), calls) - (
        timed(lambda _: scratch.fill_(1), calls) if evict_l2 else 0.0)
    floor_us = batch * ctx * HKV * D * 2 * 2 / bw * 1e6
    return dict(batch=batch, ctx=ctx, block_size=bs, splits=splits, evict_l2=evict_l2,
                us=round(us, 2), floor_us=round(floor_us, 2), ratio=round(us / floor_us, 2))


def main() -> None:
    global HQ, HKV, D
    p = argparse.ArgumentParser()
    p.add_argument("--ctx", type=int, default=640)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--block-sizes", type=int, nargs="+", default=[32])
    p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--tiles", type=int, nargs="+", default=[pd.TILE_TOKENS])
    p.add_argument("--warps", type=int, nargs="+", default=[pd.NUM_WARPS])
    p.add_argument("--evict-l2", action="store_true")
    p.add_argument("--heads", type=int, nargs=3, default=[HQ, HKV, D])
    p.add_argument("--json")
    a = p.parse_args()
    HQ, HKV, D = a.heads
    bw = copy_bw()
    print(f"device {torch.cuda.get_device_name()} copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    for b, bs, s, tile, warps in itertools.product(a.batches, a.block_sizes, a.splits, a.tiles,
                                                   a.warps):
        pd.TILE_TOKENS, pd.NUM_WARPS = tile, warps
        rows.append(run(b, a.ctx, bs, s, bw, a.evict_l2) | {"tile": tile, "warps": warps})
        print(json.dumps(rows[-1]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bw": bw, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
