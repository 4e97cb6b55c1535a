"""Probe: kernel-level profile of decode steps (graph replay) at a few batch sizes.

    python benchmarks/probes/profile_step.py --batch-sizes 1 32 --capture-sizes 1 32

Prints, per batch size, the kernels of one decode step grouped by name (count, total µs),
and dynamo's graph-break counters.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from fullgraph import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-0.6b-random")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--capture-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    llm = LLM(a.model, cudagraph_capture_sizes=a.capture_sizes, cudagraph_mode="full_decode_only")
    engine = llm.engine
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    for b in a.batch_sizes:
        for i in range(b):
            engine.add_request(f"p{b}-{i}", rng.integers(0, 50000, a.input_len).tolist(), params)
        while any(r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running) \
                or engine.scheduler.waiting:
            engine.step()
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.step()
            torch.cuda.synchronize()
        groups = defaultdict(lambda: [0, 0.0])
        for e in prof.events():
            if e.device_type.name == "CUDA":
                g = groups[e.name[:90]]
                g[0] += 1
                g[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        total = sum(g[1] for g in groups.values())
        print(f"\n=== batch {b}: {sum(g[0] for g in groups.values())} kernels, {total:.0f} us")
        for name, (n, us) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:a.top]:
            print(f"{n:5d} {us:9.1f} us  {name}")
        while engine.has_unfinished_requests():
            engine.step()
    from torch._dynamo.utils import counters
    print("\ngraph breaks:", dict(counters["graph_break"]))
    print("stats:", dict(counters["stats"]))


if __name__ == "__main__":
    main()
