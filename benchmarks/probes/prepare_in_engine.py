"""Probe: host time of a step's input preparation inside the engine loop (vs probes/prepare.py,
which calls InputBuffers.prepare alone in a tight loop), B decoding requests.

    python benchmarks/probes/prepare_in_engine.py 32 [--sync] [--no-gc]
    python benchmarks/probes/prepare_in_engine.py 32 --model qwen3-0.6b-random --device cuda

Prints, per phase of `ModelRunner.launch`'s timed region (dispatch, InputBuffers.prepare,
its copy launch, the backend's prepare), the median and p10/p90 of wall time and of the
thread's CPU time: where wall time exceeds CPU time the thread waited (descheduled, a
blocking driver call); where both are high the host work itself is slow.

On the CPU the tiny model with the SDPA backend runs eagerly, so steps are cheap and the
engine's other host work (scheduling, output processing) sits between two prepares as it
does on a GPU host. Eager steps re-slice the device views each step (graph shapes keep
them), ~40 µs of the figure at batch 32.
"""
from __future__ import annotations

import argparse
import gc
import os
import time
from collections import defaultdict

import numpy as np
import torch

from fullgraph import LLM, SamplingParams
from profile_step import start_decoding      # this directory's probe


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("batch", type=int)
    p.add_argument("--model", default="tiny-qwen3")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sync", action="store_true", help="no async scheduling")
    p.add_argument("--no-gc", action="store_true")
    p.add_argument("--steps", type=int, default=150)
    a = p.parse_args()
    if a.no_gc:
        gc.disable()
    kwargs = dict(device=a.device, async_scheduling=not a.sync, max_num_seqs=max(a.batch, 8))
    if a.device == "cpu":
        torch.set_num_threads(1)
        kwargs["attention_backend"] = "sdpa"
    else:
        kwargs.update(cudagraph_capture_sizes=[a.batch], num_gpu_blocks_override=a.batch * 64 + 64)
    llm = LLM(a.model, **kwargs)
    engine = llm.engine
    runner = engine.runner
    buffers = runner.buffers
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=a.steps + 50, ignore_eos=True)
    start_decoding(engine, [rng.integers(0, 200, 500).tolist() for _ in range(a.batch)], params,
                   "r", steady_steps=0)

    wall, cpu = defaultdict(list), defaultdict(list)

    def timed(name, obj, attr):
        fn = getattr(obj, attr)

        def wrapper(*args, **kw):
            t, c = time.perf_counter(), time.thread_time()
            out = fn(*args, **kw)
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.thread_time() - c)
            return out
        setattr(obj, attr, wrapper)

    timed("dispatch", runner.dispatcher, "dispatch")
    timed("InputBuffers.prepare", buffers, "prepare")
    timed("  of it: arena copy launch", buffers.arena, "copy_to_gpu")
    timed("backend.prepare", runner.backend, "prepare")
    timed("engine.step", engine, "step")
    p0, n0 = runner.prepare_seconds, runner.num_steps
    for _ in range(a.steps):
        engine.step()
    launched = runner.num_steps - n0
    print(f"batch {a.batch} on {a.device} ({'sync' if a.sync else 'async'}), {launched} steps, "
          f"cpu {os.sched_getaffinity(0).__len__()} allowed; launch's timed region "
          f"{1e6 * (runner.prepare_seconds - p0) / max(launched, 1):.1f} µs/step (mean)")
    print(f"{'phase':30s} {'wall p10/med/p90 µs':>24s} {'cpu p10/med/p90 µs':>24s}")
    for name in wall:
        w, c = (np.percentile(1e6 * np.array(x[name]), [10, 50, 90]) for x in (wall, cpu))
        print(f"{name:30s} {'/'.join(f'{v:.1f}' for v in w):>24s} "
              f"{'/'.join(f'{v:.1f}' for v in c):>24s}")


if __name__ == "__main__":
    main()
