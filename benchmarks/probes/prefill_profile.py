"""Kernel-level profile of one full-budget prefill step (issue 27: prefill at the compute
roofline): `--requests` prompts of `--input-len` tokens admitted at once, so the first step
runs `max_num_batched_tokens` of them (8,192 by default: 16 x 512). The step runs once to warm
up (compiles, a lazily captured graph), then once under torch.profiler. Prints the step's
wall time, the kernels grouped by name (count, µs, share), the bf16 TFLOP/s the step's
projections imply (2 x parameters x tokens), and the step's FLOP with causal attention as a
share of the bf16 peak measured in the same run (the best of a few large cuBLAS matmuls).
Then the TTFT of `--ttft-requests` prompts admitted at once, through the engine's own step
loop: its wall time, each step call's host time and the GPU's idle gaps in that window.

    python benchmarks/probes/prefill_profile.py [--model qwen3-0.6b-random] [--input-len 512]
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from fullgraph import LLM, SamplingParams
from profile_step import print_idle, random_prompts   # this folder, sys.path[0] when run


def admit(engine, prompts: list[list[int]], tag: str, max_tokens: int) -> list[str]:
    """Every prompt as a greedy request; their ids. The device is idle after."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    torch.cuda.synchronize()
    return ids


def abort(engine, ids: list[str]) -> None:
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()


def prefill_step(engine, prompts: list[list[int]], tag: str) -> float:
    """Admit every prompt, run the first step (the budget's worth of prompt tokens), abort
    the requests; returns the step's wall ms (the engine waits for its samples)."""
    ids = admit(engine, prompts, tag, 1)
    t = time.perf_counter()
    engine.step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) * 1e3
    abort(engine, ids)
    return ms


def ttft_window(engine, prompts: list[list[int]], tag: str) -> tuple[float, list[float]]:
    """Admit every prompt and step (the engine's own loop: async scheduling as configured)
    until each has its first token; returns the wall ms of that window and of each
    `engine.step()` call in it. The requests are aborted after."""
    ids = admit(engine, prompts, tag, 2)
    t0 = time.perf_counter()
    steps = []
    while not all(r.output_token_ids for r in engine.requests.values()):
        t = time.perf_counter()
        engine.step()
        steps.append((time.perf_counter() - t) * 1e3)
    wall = (time.perf_counter() - t0) * 1e3
    abort(engine, ids)
    return wall, steps


def profile_ttft(engine, rng, requests: int, input_len: int, top: int) -> None:
    """The TTFT of `requests` prompts at once (128 x 512: issue 27's <= 150 ms), warmed up
    once, then profiled: the window's wall time, each step call's host time, the kernels'
    time and where the GPU idles."""
    wall, _ = ttft_window(engine, random_prompts(rng, requests, input_len), "tw")
    print(f"\nTTFT of {requests} x {input_len} (warm-up run): {wall:.1f} ms")
    wall, _ = ttft_window(engine, random_prompts(rng, requests, input_len), "tt")
    print(f"TTFT of {requests} x {input_len} (timed run, no profiler): {wall:.1f} ms")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall, steps = ttft_window(engine, random_prompts(rng, requests, input_len), "tp")
    kernels = sum(e.device_time_total for e in prof.events() if e.device_type.name == "CUDA")
    print(f"under the profiler: {wall:.1f} ms, {len(steps)} step calls (host ms each: "
          + ", ".join(f"{s:.2f}" for s in steps) + f"), kernels {kernels / 1e3:.2f} ms")
    print_idle(prof, len(steps), top)


def matmul_peak(n: int = 8192, repeats: int = 20) -> float:
    """bf16 TFLOP/s of an n x n x n cuBLAS matmul, the best of three timed batches."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * repeats / (time.perf_counter() - t) / 1e12)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-0.6b-random")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--ttft-requests", type=int, default=128,
                    help="then the TTFT of this many prompts at once (0: not measured)")
    a = ap.parse_args()
    llm = LLM(a.model, max_num_batched_tokens=a.max_num_batched_tokens)
    engine = llm.engine
    rng = np.random.default_rng(0)
    tokens = min(a.requests * a.input_len, a.max_num_batched_tokens)
    for i in range(2):
        ms = prefill_step(engine, random_prompts(rng, a.requests, a.input_len), f"w{i}")
        print(f"warm-up step {i}: {ms:.2f} ms")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = prefill_step(engine, random_prompts(rng, a.requests, a.input_len), "p")
    groups = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type.name == "CUDA":
            g = groups[e.name[:90]]
            g[0] += 1
            g[1] += e.device_time_total
    total = sum(g[1] for g in groups.values())
    params = sum(p.numel() for n, p in engine.runner.model.named_parameters()
                 if "embed" not in n)
    print(f"\n{torch.cuda.get_device_name()}, {a.model}: a {tokens}-token prefill step, "
          f"{wall:.2f} ms wall, {total / 1e3:.2f} ms of kernels "
          f"({sum(g[0] for g in groups.values())}); projections {2 * params * tokens / 1e12:.1f} "
          f"TFLOP -> {2 * params * tokens / wall / 1e9:.0f} TFLOP/s over the wall time")
    for name, (n, us) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:a.top]:
        print(f"{n:5d} {us:9.1f} us {100 * us / total:5.1f}%  {name}")
    att = engine.runner.cache_specs.attention
    per_req = min(a.input_len, tokens)
    causal = 4 * att.num_heads * att.head_dim * per_req * (per_req + 1) / 2   # QK^T and PV
    flop = 2 * params * tokens + att.num_layers * (tokens // per_req) * causal
    peak = matmul_peak()
    achieved = flop / wall / 1e9
    print(f"step: {flop / 1e12:.2f} TFLOP with causal attention -> {achieved:.0f} TFLOP/s, "
          f"{100 * achieved / peak:.0f}% of the bf16 matmul peak measured now ({peak:.0f} "
          f"TFLOP/s, 8192^3)")
    if a.ttft_requests:
        profile_ttft(engine, rng, a.ttft_requests, a.input_len, a.top)


if __name__ == "__main__":
    main()
