"""Probe: where graph capture spends its time — per captured shape (warmup, capture) and per
Triton compile (our kernels and inductor's; a call answered from the on-disk cache counts
too, and is fast).

    python benchmarks/probes/startup.py [--model qwen3-0.6b-random] [--top 25] [--json F]
                                        [--no-compile-ahead] [--max-model-len N]
                                        [--num-gpu-blocks-override N]

Prints the capture report, the slowest warmups, the Triton compiles grouped by kernel name
(count, seconds) and torch.compile's own phase times.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

from fullgraph import LLM
from fullgraph.worker.cudagraph import manager


def _time_triton_compiles(record: dict[str, list[float]], calls: list) -> None:
    import triton
    import triton.compiler.compiler as compiler
    import triton.runtime.jit as jit
    original = compiler.compile

    def timed(src, *args, **kwargs):
        cache = triton.knobs.cache.dir
        before = len(os.listdir(cache)) if os.path.isdir(cache) else 0
        t0 = time.perf_counter()
        try:
            return original(src, *args, **kwargs)
        finally:
            name = getattr(getattr(src, "fn", None), "__name__", None) or str(src)[:60]
            record[name].append(time.perf_counter() - t0)
            written = (len(os.listdir(cache)) if os.path.isdir(cache) else 0) - before
            calls.append((name, round(time.perf_counter() - t0, 3), cache, written,
                         repr(getattr(src, "attrs", "")), repr(getattr(src, "constants", "")),
                         repr(getattr(src, "signature", ""))))

    for module in (compiler, jit, triton.compiler, triton):
        if getattr(module, "compile", None) is original:
            module.compile = timed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-0.6b-random")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json")
    p.add_argument("--compile-ahead", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-model-len", type=int, help="`bench latency` uses 672")
    p.add_argument("--num-gpu-blocks-override", type=int,
                   help="`bench latency` sets one (2752), so no memory-profiling step runs")
    a = p.parse_args()
    compiles: dict[str, list[float]] = defaultdict(list)
    calls: list = []
    _time_triton_compiles(compiles, calls)
    shapes: list[tuple[str, float, float]] = []
    original_capture = manager.CUDAGraphManager.capture

    def capture(self, keys, create_forward_fn, progress=True, **kwargs):
        def timed_fn(key, warmup):
            fn, state = create_forward_fn(key, warmup)

            def run():
                t0 = time.perf_counter()
                out = fn()
                shapes.append((str(key), warmup, time.perf_counter() - t0, t0))
                return out
            return run, state
        return original_capture(self, keys, timed_fn, progress, **kwargs)

    manager.CUDAGraphManager.capture = capture
    pools: list = []
    from fullgraph.worker import compile_worker
    original_init = compile_worker.CompileWorkers.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        pools.append(self)
    compile_worker.CompileWorkers.__init__ = init
    t0 = time.perf_counter()
    llm = LLM(a.model, compile_ahead=a.compile_ahead, max_model_len=a.max_model_len,
              num_gpu_blocks_override=a.num_gpu_blocks_override)
    start = time.perf_counter() - t0
    report = llm.engine.runner.capture_report
    print(f"engine start {start:.1f} s; capture {report.seconds:.1f} s "
          f"({report.warmup_seconds:.1f} s warming up), {report.num_graphs} graphs")
    warm = sorted((s[:3] for s in shapes if s[1]), key=lambda s: -s[2])
    print(f"\nslowest warmups (of {len(warm)}, {sum(s[2] for s in warm):.1f} s):")
    for key, _, dt in warm[:a.top]:
        print(f"  {dt:6.2f} s  {key}")
    total = sum(sum(v) for v in compiles.values())
    print(f"\nTriton compile calls: {sum(len(v) for v in compiles.values())}, {total:.1f} s")
    for name, ts in sorted(compiles.items(), key=lambda kv: -sum(kv[1]))[:a.top]:
        print(f"  {len(ts):4d} {sum(ts):6.2f} s  {name}")
    worker_log = [entry for pool in pools for entry in pool.log]
    if worker_log:
        t0 = min(e[1] for e in worker_log)
        starts = [s[3] - t0 for s in shapes if s[1]]
        print(f"\nwarmups ran from {min(starts):.2f} to {max(starts):.2f} s (after the first "
              "submit); captures from "
              f"{min((s[3] - t0 for s in shapes if not s[1]), default=float('nan')):.2f} s")
        print(f"\ncompile workers ({len({e[4] for e in worker_log})} processes): kernel, "
              "submitted / started / done, s after the first submit")
        for kernel, sub, began, end, pid in sorted(worker_log, key=lambda e: e[2]):
            print(f"  {pid:8d} {sub - t0:6.2f} {began - t0:6.2f} {end - t0:6.2f}  {kernel}")
    from torch._dynamo.utils import compile_times
    print("\n" + str(compile_times()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"engine_start_s": start, "capture_s": report.seconds,
                       "warmup_s": report.warmup_seconds,
                       "graphs": report.num_graphs,
                       "warmups": warm, "triton_compiles": dict(compiles),
                       "compile_calls": calls, "compile_workers": worker_log}, f, indent=1)


if __name__ == "__main__":
    main()
