"""Where an eager decode step's host time goes (issue 27): `--enforce-eager`, one request
decoding (batch 1 by default), the GPU idle most of the step, so a step's wall time is the
host's. Per step, averaged over `--steps` steady decode steps:

- wall: `engine.step()` (the engine waits for the step's samples, so this is the whole step);
- forward: the model's forward (`ModelRunner._run_model`), host time to enqueue it;
- triton: inside our Triton launches (`Launcher.launch`, layers/launch.py), and how many;
- the same forward with every Triton launch skipped (`Launcher.launch` returns at once):
  what is left is Python, torch's own ops and allocations;
- torch.profiler's CPU view of one step: the ops with the most self time;
- per kernel, a launch through Triton's JIT, through `Launcher` and the compiled kernel's
  raw `run` with its arguments bound once (the floor);
- cProfile of a few steps: what `Launcher.launch` calls, and the functions with the most
  self time.

    python benchmarks/probes/eager_host.py [--model qwen3-0.6b-random] [--batch-size 1]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from contextlib import contextmanager

import numpy as np
import torch
import triton
from torch.profiler import ProfilerActivity, profile
from triton import knobs

from fullgraph import LLM, SamplingParams
from fullgraph.layers.launch import Launcher
from graph_timing import per_call_us, step_ms   # this folder, sys.path[0] when run
from profile_step import random_prompts, start_decoding


@contextmanager
def timed_method(owner, name: str, totals: dict, skip: bool = False):
    """Wrap `owner.name` so its calls' host time and count add up in `totals[name]`
    (`skip`: the call does nothing and returns None)."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = None if skip else original(*args, **kwargs)
        totals[name][0] += time.perf_counter() - t
        totals[name][1] += 1
        return out
    totals.setdefault(name, [0.0, 0])
    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def launch_floor(engine, calls: int) -> None:
    """Per kernel of an eager step (the most launched first): host µs a launch through
    Triton's JIT (`kernel[grid](...)`), through our `Launcher` (layers/launch.py, as the
    layers launch) and the compiled kernel's raw `run` with its arguments bound once (the
    floor). The arguments are the step's own; the kernels run again on them (outputs are
    garbage, overwritten by the next step)."""
    seen: dict = {}
    original = Launcher.launch

    def record(self, grid, args, kwargs):
        original(self, grid, args, kwargs)
        entry = seen.setdefault(self.kernel.fn.__name__, [self, args, kwargs, tuple(grid), 0])
        entry[4] += 1

    Launcher.launch = record
    try:
        engine.step()
    finally:
        Launcher.launch = original
    torch.cuda.synchronize()
    dev = torch.cuda.current_device()
    stream = triton.runtime.driver.active.get_current_stream(dev)
    print(f"launch host time, µs ({calls} calls each): JIT, Launcher, the compiled kernel's "
          "raw run")
    for name, (launcher, args, kwargs, grid, count) in sorted(seen.items(),
                                                               key=lambda kv: -kv[1][4]):
        jit = launcher.kernel
        ck = jit[grid](*args, **kwargs)
        bound = tuple(jit.device_caches[dev][4](*args, **kwargs)[0].values())
        g = tuple(grid) + (1,) * (3 - len(grid))
        meta = ck.launch_metadata(g, stream, *bound)

        def raw():
            ck.run(g[0], g[1], g[2], stream, ck.function, ck.packed_metadata, meta,
                   knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound)

        def via_jit():
            jit[grid](*args, **kwargs)

        def via_launcher():
            launcher[grid](*args, **kwargs)

        try:
            t_jit, t_raw = per_call_us(via_jit, calls), per_call_us(raw, calls)
            t_ours = per_call_us(via_launcher, calls)
        except Exception as e:      # another Triton's compiled-kernel API
            print(f"  {name:34s} x{count:3d}: failed: {type(e).__name__}: {e}")
            continue
        print(f"  {name:34s} x{count:3d} a step, {len(bound):2d} arguments: JIT {t_jit:6.1f}, "
              f"Launcher {t_ours:6.1f}, raw {t_raw:6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-0.6b-random")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--calls", type=int, default=2000)
    a = ap.parse_args()
    llm = LLM(a.model, enforce_eager=True, async_scheduling=False)
    engine, runner = llm.engine, llm.engine.runner
    params = SamplingParams(temperature=0.0, max_tokens=10 * a.steps + 50, ignore_eos=True)
    start_decoding(engine, random_prompts(np.random.default_rng(0), a.batch_size,
                                          a.input_len), params, "e")
    n = a.steps
    wall = step_ms(engine, n)
    totals: dict = {}
    with timed_method(runner, "_run_model", totals), timed_method(Launcher, "launch", totals):
        timed_wall = step_ms(engine, n)
    forward_ms = totals["_run_model"][0] / n * 1e3
    triton_ms, launches = totals["launch"][0] / n * 1e3, totals["launch"][1] / n
    skipped: dict = {}
    with timed_method(runner, "_run_model", skipped), \
            timed_method(Launcher, "launch", skipped, skip=True):
        for _ in range(3):   # no Triton kernel runs: garbage outputs (overwritten next step)
            runner._forward_eager(runner._last_step)
    torch.cuda.synchronize()
    bare_ms = skipped["_run_model"][0] / 3 * 1e3
    print(f"{torch.cuda.get_device_name()}, {a.model}, batch {a.batch_size}, eager")
    print(f"wall {wall:.3f} ms/step ({timed_wall:.3f} with the timers)")
    print(f"forward {forward_ms:.3f} ms/step: {launches:.0f} Triton launches, "
          f"{triton_ms:.3f} ms inside them ({triton_ms / max(launches, 1) * 1e3:.1f} us each)")
    print(f"forward with the Triton launches skipped: {bare_ms:.3f} ms "
          "(Python, torch ops and allocations)")
    print(f"outside the forward: {timed_wall - forward_ms:.3f} ms/step (scheduler, inputs, "
          "sampler, the wait for the samples)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top,
                                    max_name_column_width=60))
    launch_floor(engine, a.calls)
    # cProfile of a few steps (its own overhead inflates every call, evenly): what a
    # Triton launch spends its time on, then the step's Python by self time
    py = cProfile.Profile()
    py.enable()
    step_ms(engine, 5)
    py.disable()
    stats = pstats.Stats(py)
    stats.sort_stats("tottime")
    print("Launcher.launch's callees over 5 steps:")
    stats.print_callees(r"launch.py:\d+\(launch\)")
    stats.print_stats(a.top)


if __name__ == "__main__":
    main()
