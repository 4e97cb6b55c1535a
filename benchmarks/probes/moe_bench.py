"""Probe: the routed experts (`fullgraph::moe_experts`, layers/moe/grouped_gemm.py) at
Qwen3-Next-80B-A3B's shapes (H 2048, 512 experts, top-10, I 512), graph-replayed.
Prints µs per call and the GB/s of the distinct experts' weights it read (each expert read
once is the floor); the whole block (router, shared expert, experts); the router's top-k
kernel against torch's ops; the pair sort, torch's against the one-program kernel. Each
captured call routes a different input, so consecutive calls hit different experts, as a
model's layers do, rather than timing experts left in L2.

    python benchmarks/probes/moe_bench.py --tokens 1 8 32 256 4096
    python benchmarks/probes/moe_bench.py --tokens 1 32 --sweep    # tile candidates
"""
from __future__ import annotations

import argparse

import torch

from fullgraph.layers.moe import SparseMoeBlock, route, sort_by_expert
from fullgraph.layers.moe.grouped_gemm import experts_triton, tile_config

H, E, TOP_K, I = 2048, 512, 10, 512


def timed(fn, calls: int, reps: int = 10) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in range(calls):
            fn(c)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in range(calls):
            fn(c)
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / (calls * reps)


def torch_route(logits: torch.Tensor):
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    w, ids = torch.topk(probs, TOP_K, dim=-1)
    return (w / w.sum(-1, keepdim=True)).to(logits.dtype), ids


def align(ids: torch.Tensor) -> torch.Tensor:
    """The one-program sort alone."""
    from fullgraph.layers.moe.grouped_gemm import _align_kernel, triton
    p = ids.numel()
    perm = torch.empty(p, dtype=torch.int32, device=ids.device)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=ids.device)
    _align_kernel[(1,)](ids, perm, offsets, p, BLOCK_P=max(16, triton.next_power_of_2(p)),
                        BLOCK_E=E, USE_PDL=False, num_warps=4 if p <= 1024 else 8)
    return perm


def candidates(t: int, gate_up: bool) -> list[tuple[int, int, int, int, int]]:
    base = tile_config(t * TOP_K, E, I if gate_up else H, H if gate_up else I, gate_up)
    bm = base[0]
    out = {base}
    for bn in (16, 32, 64, 128):
        for bk in (64, 128, 256):
            for warps, stages in ((2, 4), (4, 4)):
                if gate_up and bn == 128:
                    continue
                out.add((bm, bn, bk, warps, stages))
    return sorted(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 8, 32, 128, 1024, 4096])
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--sweep", action="store_true", help="time tile candidates per GEMM")
    a = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    gate_up = torch.randn(E, 2 * I, H, device=dev, dtype=dt) * H ** -0.5
    down = torch.randn(E, H, I, device=dev, dtype=dt) * I ** -0.5
    expert_bytes = 3 * I * H * dt.itemsize
    block = SparseMoeBlock(H, E, TOP_K, I, shared_expert_intermediate_size=I)
    block.experts.gate_up_proj.data, block.experts.down_proj.data = gate_up, down
    block = block.to(dev, dt)
    with torch.no_grad():
        block.gate.weight.normal_(0, H ** -0.5)
    for t in a.tokens:
        xs = [torch.randn(t, H, device=dev, dtype=dt) for _ in range(a.calls)]
        routes = [route(torch.randn(t, E, device=dev), TOP_K, True) for _ in range(a.calls)]
        routes = [(w.to(dt), ids) for w, ids in routes]
        distinct = sum(ids.unique().numel() for _, ids in routes) / a.calls

        def run(configs):
            return timed(lambda c: experts_triton(xs[c], *routes[c], gate_up, down,
                                                  configs=configs), a.calls)
        us = run(None)
        sort_us = timed(lambda c: sort_by_expert(routes[c][1], E), a.calls)
        align_us = timed(lambda c: align(routes[c][1]), a.calls) if t * TOP_K <= 1024 else 0.0
        gbs = distinct * expert_bytes / us / 1e3
        logits = [torch.randn(t, E, device=dev, dtype=dt) for _ in range(a.calls)]
        route_us = timed(lambda c: route(logits[c], TOP_K, True), a.calls)
        torch_route_us = timed(lambda c: torch_route(logits[c]), a.calls)
        with torch.no_grad():
            block_us = timed(lambda c: block(xs[c]), a.calls)
        print(f"T={t:5d} block {block_us:.1f} us, route {route_us:.1f} "
              f"(torch's {torch_route_us:.1f})")
        print(f"T={t:5d} experts/call={distinct:6.1f} {us:8.1f} us (sort: torch {sort_us:.1f}, "
              f"align {align_us:.1f}) {gbs:7.0f} GB/s  "
              f"gate_up {tile_config(t * TOP_K, E, I, H, True)} "
              f"down {tile_config(t * TOP_K, E, H, I, False)}", flush=True)
        if not a.sweep:
            continue
        default = (tile_config(t * TOP_K, E, I, H, True), tile_config(t * TOP_K, E, H, I, False))
        for which in (0, 1):
            best = []
            for cfg in candidates(t, which == 0):
                configs = (cfg, default[1]) if which == 0 else (default[0], cfg)
                try:
                    best.append((run(configs), cfg))
                except Exception as exc:      # out of shared memory, registers
                    print(f"   {cfg}: {type(exc).__name__}")
            best.sort()
            print(f"  {'gate_up' if which == 0 else 'down'} best: "
                  + ", ".join(f"{cfg} {us:.1f}" for us, cfg in best[:4]), flush=True)


if __name__ == "__main__":
    main()
