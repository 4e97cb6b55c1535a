"""Probe: FlexAttention paged decode, one layer of Qwen3-0.6B shapes, graph-replayed.

Variants: KV block size, SPLIT_KV (inductor's default vs one sized to the SM count), and
whether blocks entirely below the query are passed as *full* blocks (no mask_mod) with only
the last, partial block masked. Prints µs per call and the ratio to the KV-read floor.

    python benchmarks/probes/flex_decode.py --ctx 640 --batches 1 8 32 128
    python benchmarks/probes/flex_decode.py --batches 8 32 --splits 16 4 --cache-blocks 0 33025
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

HQ, HKV, D = 16, 8, 128


def run(batch: int, ctx: int, bs: int, split: int | None, full: bool, bw: float,
        cache_blocks: int = 0) -> dict:
    dev = "cuda"
    max_blocks = -(-ctx // bs) + 1
    nb = max(batch * max_blocks + 1, cache_blocks)
    kv = torch.randn(2, nb * bs, HKV, D, device=dev, dtype=torch.bfloat16)
    perm = torch.randperm(nb - 1, device=dev)[:batch * max_blocks].int() + 1
    table = perm.view(batch, max_blocks).contiguous()
    logical = torch.zeros(nb, dtype=torch.int32, device=dev)
    logical[table.flatten().long()] = torch.arange(max_blocks, device=dev, dtype=torch.int32).repeat(batch)
    seq = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    q_off = seq - 1

    def mask(b, h, q_idx, kv_idx):
        phys = kv_idx // bs
        lb = logical[phys]
        return (table[b, lb] == phys) & (lb * bs + kv_idx % bs <= q_off[b] + q_idx)

    n_all = (seq + bs - 1) // bs
    if full:
        n_full = (q_off + 1) // bs
        n_part = n_all - n_full
        # the kernel takes MAX_KV_IDX from the partial index table: give both the same width
        col = (n_full[:, None] + torch.arange(max_blocks, device=dev)).clamp(max=max_blocks - 1)
        part_idx = table.gather(1, col.long()).contiguous()
        bm = BlockMask.from_kv_blocks(n_part.view(batch, 1, 1), part_idx.view(batch, 1, 1, -1),
                                      n_full.view(batch, 1, 1), table.view(batch, 1, 1, -1),
                                      BLOCK_SIZE=(128, bs), mask_mod=mask,
                                      seq_lengths=(1, nb * bs), compute_q_blocks=False)
    else:
        bm = BlockMask.from_kv_blocks(n_all.view(batch, 1, 1), table.view(batch, 1, 1, -1),
                                      BLOCK_SIZE=(128, bs), mask_mod=mask,
                                      seq_lengths=(1, nb * bs), compute_q_blocks=False)
    q = torch.randn(batch, HQ, 1, D, device=dev, dtype=torch.bfloat16)
    key = kv[0].permute(1, 0, 2).unsqueeze(0)
    value = kv[1].permute(1, 0, 2).unsqueeze(0)
    opts = {"SPLIT_KV": split} if split else None
    fn = torch.compile(lambda q: flex_attention(q, key, value, block_mask=bm, enable_gqa=True,
                                                kernel_options=opts), dynamic=False, fullgraph=True)
    t0 = time.perf_counter()
    out = fn(q)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    # reference: dense SDPA over each request's gathered KV
    ks = kv[0][(table[:, :, None] * bs + torch.arange(bs, device=dev)).view(batch, -1)[:, :ctx]]
    vs = kv[1][(table[:, :, None] * bs + torch.arange(bs, device=dev)).view(batch, -1)[:, :ctx]]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, ks.transpose(1, 2), vs.transpose(1, 2), enable_gqa=True)
    err = (out.float() - ref.float()).abs().max().item()
    calls = 20
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn(q)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn(q)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    us = e0.elapsed_time(e1) * 1e3 / (reps * calls)
    floor_us = batch * ctx * HKV * D * 2 * 2 / bw * 1e6
    return dict(batch=batch, ctx=ctx, block_size=bs, cache_blocks=nb, split=split or "default", full=full,
                us=round(us, 2), floor_us=round(floor_us, 2), ratio=round(us / floor_us, 2),
                max_err=err, compile_s=round(compile_s, 2))


def copy_bw() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        y.copy_(x)
    e1.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (e0.elapsed_time(e1) / 1e3)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ctx", type=int, default=640)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--block-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--splits", type=int, nargs="+", default=[0, 4, 16],
                   help="SPLIT_KV values; 0 = inductor's default (2 * SMs // (batch * kv heads))")
    p.add_argument("--full", type=int, nargs="+", default=[0])
    p.add_argument("--cache-blocks", type=int, nargs="+", default=[0],
                   help="KV cache size in blocks (0: just what the batch needs); the engine's "
                        "cache is far larger than the batch")
    p.add_argument("--json")
    a = p.parse_args()
    import torch._dynamo.config as dc
    dc.recompile_limit = dc.cache_size_limit = 1000
    bw = copy_bw()
    print(f"device {torch.cuda.get_device_name()} copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    for b, bs, split, full, nb in itertools.product(a.batches, a.block_sizes, a.splits, a.full,
                                                    a.cache_blocks):
        r = run(b, a.ctx, bs, split or None, bool(full), bw, nb)
        rows.append(r)
        print(json.dumps(r), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bw": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
