"""Timing helpers of the probes. `replay_ms`: one call as the runner runs it, captured in a
CUDA graph (after two warm-up calls on a side stream) and replayed; the mean of `iters`
replays from CUDA events, in ms. `per_call_us`: the host time of one eager call, in µs.
`step_ms`: an engine's wall time a step over `steps` steps, in ms."""
from __future__ import annotations

import time

import torch


def per_call_us(fn, calls: int) -> float:
    """Host time a call of `fn`, µs: `calls` calls after 50 warm-up calls, timed before the
    final synchronization (the device's work queues behind the host's)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / calls * 1e6


def replay_ms(fn, iters: int) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def step_ms(engine, steps: int) -> float:
    """Wall ms a step of `engine.step()` over `steps` steps, the device idle at both ends."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3
