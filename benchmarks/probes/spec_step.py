"""Probe: where a speculative-decoding step's time goes, against a plain decode step.

    python tests/spec_pairs.py --source qwen3-0.6b-random --disagree 0.3 --out /tmp/pair
    python benchmarks/probes/spec_step.py --target /tmp/pair/target --drafter /tmp/pair/drafter

Per batch size: each step's wall time of a 128-token greedy run (E: the step ran the target
eagerly, cN: it compiled N graphs), then the GPU timeline of a few steady steps, with and
without speculation: the GPU spans and the idle gaps between them, and the kernels by
what each adds to the span (its end minus the previous kernel's end: with PDL kernels
overlap, so durations sum to more than the step). `--trace DIR` also writes the traces.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from fullgraph import LLM, SamplingParams
from fullgraph.worker.model_runner import compile_count


def add(engine, rng, batch: int, max_tokens: int) -> None:
    for i in range(batch):
        engine.add_request(f"p{time.monotonic_ns()}-{i}", rng.integers(3, 30000, 512).tolist(),
                           SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))


def step_times(engine, rng, batch: int) -> str:
    add(engine, rng, batch, 128)
    dispatcher, out = engine.runner.dispatcher, []
    while engine.has_unfinished_requests():
        c0, g0 = compile_count(), dispatcher.num_graph_steps
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        out.append(f"{ms:.2f}" + ("" if dispatcher.num_graph_steps > g0 else "E")
                   + (f"c{compile_count() - c0}" if compile_count() > c0 else ""))
    return " ".join(out)


def timeline(engine, rng, batch: int, steps: int, trace: str | None) -> None:
    add(engine, rng, batch, 400)
    for _ in range(8):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(f"{trace}/spec_step_b{batch}_{time.monotonic_ns()}.json")
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"),
                     key=lambda e: e.time_range.start)
    if not kernels:
        print("  no CUDA kernels were profiled")
        return
    groups = [[kernels[0]]]
    for e in kernels[1:]:          # a step: kernels with < 100 µs of idle GPU between them
        if e.time_range.start - groups[-1][-1].time_range.end > 100:
            groups.append([])
        groups[-1].append(e)
    spans = [g[-1].time_range.end - g[0].time_range.start for g in groups]
    gaps = [b[0].time_range.start - a[-1].time_range.end for a, b in zip(groups, groups[1:])]
    print(f"  GPU spans (µs; one per step where the GPU idles between steps): "
          f"{' '.join(f'{s:.0f}' for s in spans)}; idle between: "
          f"{' '.join(f'{g:.0f}' for g in gaps)}")
    added, end = defaultdict(float), kernels[0].time_range.start
    for e in kernels:              # what each kernel adds to the busy timeline, per step
        added[e.name[:60]] += max(0.0, e.time_range.end - max(end, e.time_range.start)) / steps
        end = max(end, e.time_range.end)
    for name, us in sorted(added.items(), key=lambda x: -x[1])[:12]:
        print(f"    {us:8.1f} µs/step  {name}")
    while engine.has_unfinished_requests():
        engine.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--drafter", required=True)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--trace", default=None)
    ns = ap.parse_args()
    spec = {"method": "eagle3", "model": ns.drafter, "num_speculative_tokens": ns.k}
    for name, kw in (("speculative", {"speculative_config": spec}), ("plain", {})):
        llm = LLM(ns.target, max_model_len=1024, max_num_seqs=max(ns.batch_sizes),
                  num_gpu_blocks_override=64 * max(ns.batch_sizes) + 64, **kw)
        rng = np.random.default_rng(0)
        for b in ns.batch_sizes:
            add(llm.engine, rng, b, 4)
            while llm.engine.has_unfinished_requests():
                llm.engine.step()
            print(f"{name} batch {b}: {step_times(llm.engine, rng, b)}", flush=True)
            timeline(llm.engine, rng, b, ns.steps, ns.trace)
        del llm
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
