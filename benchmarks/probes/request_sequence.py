"""Probe: batch-1 decode ms/step of successive requests in one engine, with an action
between them (a lead from the eighth session: in FULL mode decode steps ran ~3% slower
until the first eager model step after capture; docs/benchmarks.md).

    python benchmarks/probes/request_sequence.py 512 512 alloc 512 600 512

Each number is a request with that prompt length (a prompt longer than the largest capture
size prefills eagerly); `alloc` allocates, fills and frees 2 GiB, `empty_cache` empties the
caching allocator. Prints each request's decode ms/step (3 x 40 steps, synchronized), its KV
blocks, and the engine's eager fallbacks so far.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fullgraph import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-0.6b-random")
    p.add_argument("--cudagraph-mode", default="full")
    p.add_argument("sequence", nargs="+")
    a = p.parse_args()
    engine = LLM(a.model, cudagraph_mode=a.cudagraph_mode, enable_prefix_caching=False).engine
    rng = np.random.default_rng(0)

    def ms_per_step(n: int = 40) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            engine.step()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / n * 1e3

    for item in a.sequence:
        if item == "alloc":
            x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
            x.fill_(0)
            del x
            continue
        if item == "empty_cache":
            torch.cuda.empty_cache()
            continue
        engine.add_request(f"r{item}-{rng.integers(1 << 30)}",
                           rng.integers(0, 50000, int(item)).tolist(),
                           SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True))
        engine.step()
        engine.step()
        blocks = engine.scheduler.running[0].block_ids
        times = [round(ms_per_step(), 4) for _ in range(3)]
        print(f"prompt {item}: {times} ms/step, blocks {blocks[0]}..{blocks[-1]}, eager "
              f"fallbacks {engine.runner.dispatcher.num_eager_fallbacks}", flush=True)
        while engine.has_unfinished_requests():
            engine.step()


if __name__ == "__main__":
    main()
