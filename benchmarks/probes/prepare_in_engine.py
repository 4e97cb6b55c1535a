"""Probe: host time of InputBuffers.prepare inside the engine loop (vs probes/prepare.py,
which calls it alone in a tight loop), B decoding requests, on the CPU.

    python benchmarks/probes/prepare_in_engine.py 32 [--sync] [--no-gc]

The tiny model with the SDPA backend runs eagerly, so steps are cheap and the engine's other
host work (scheduling, output processing) sits between two prepares as it does on a GPU
host. Eager steps re-slice the device views each step (graph shapes keep them), ~40 µs of
the figure at batch 32.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import numpy as np
import torch

from fullgraph import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("batch", type=int)
    p.add_argument("--sync", action="store_true", help="no async scheduling")
    p.add_argument("--no-gc", action="store_true")
    p.add_argument("--steps", type=int, default=150)
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.no_gc:
        gc.disable()
    llm = LLM("tiny-qwen3", device="cpu", attention_backend="sdpa",
              async_scheduling=not a.sync, max_num_seqs=max(a.batch, 8))
    engine, buffers = llm.engine, llm.engine.runner.buffers
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=a.steps + 50, ignore_eos=True)
    for i in range(a.batch):
        engine.add_request(f"r{i}", rng.integers(0, 200, 500).tolist(), params)
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_tokens - 1
                                          for r in engine.scheduler.running):
        engine.step()
    times = []
    prepare = buffers.prepare

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = prepare(*args, **kwargs)
        times.append(time.perf_counter() - t0)
        return out

    buffers.prepare = timed
    for _ in range(a.steps):
        engine.step()
    print(f"batch {a.batch} ({'sync' if a.sync else 'async'}): InputBuffers.prepare in the engine "
          f"loop median {1e6 * statistics.median(times):.1f} µs, "
          f"p10 {1e6 * np.percentile(times, 10):.1f} µs")


if __name__ == "__main__":
    main()
