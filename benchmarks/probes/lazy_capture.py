"""Where a lazily captured graph's time goes (issue 27): a served run's first steps of sizes
above the start-up captures each stall the engine ~0.3 s while their graph is captured
(docs/benchmarks.md, thirtieth session), where a start-up capture takes ~6 ms a graph. The
probe starts an engine with the default capture sizes, then for each `--sizes` admits
prompts that make one prefill step of that many tokens (it runs eagerly and asks for its
graph), and profiles the next step, whose start captures it: cProfile's cumulative times of
the capture's parts (collection, synchronization, empty_cache, warm-up, the capture itself).

    python benchmarks/probes/lazy_capture.py [--model qwen3-0.6b-random] [--sizes 4608 8192]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np
import torch

from fullgraph import LLM, SamplingParams
from profile_step import random_prompts   # this folder, sys.path[0] when run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-0.6b-random")
    ap.add_argument("--sizes", type=int, nargs="+", default=[4608, 8192])
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--cudagraph-runtime", default="auto", help="fake: a CPU smoke run")
    a = ap.parse_args()
    llm = LLM(a.model, max_num_batched_tokens=max(a.sizes),
              cudagraph_runtime=a.cudagraph_runtime)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    engine, rng = llm.engine, np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    for size in a.sizes:
        for i, prompt in enumerate(random_prompts(rng, size // 512, 512)):
            engine.add_request(f"{size}-{i}", prompt, params)
        engine.step()                  # the size's first step: eager, its graph pending
        sync()
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        engine.step()                  # captures the pending size first
        sync()
        prof.disable()
        print(f"\n=== {size} tokens: the step after the eager one took "
              f"{(time.perf_counter() - t) * 1e3:.1f} ms")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(a.top)
        while engine.has_unfinished_requests():
            engine.step()


if __name__ == "__main__":
    main()
