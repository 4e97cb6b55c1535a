"""Probe: kernel-level profile of decode steps (graph replay) at a few batch sizes.

    python benchmarks/probes/profile_step.py --batch-sizes 1 32 --capture-sizes 1 32

Prints, per batch size, the kernels of one decode step grouped by name (count, total µs),
and dynamo's graph-break counters. `--timeline` also prints, for each kernel of a decoder
layer (the layers' kernels have a fixed period), the median over layers of its duration and
of the time from the previous kernel's end to its own end: with PDL a kernel starts before
its predecessor ends, so durations overlap and sum to more than the step; the end-to-end
gaps sum to the step and say what each kernel adds to it. `--steps N` profiles N steps in a
row and prints where the GPU idles between and inside them (copies included); `--variant`
applies decode_variants.py's edits first; `--external` leaves the profiling to ncu:

    ncu -k regex:"paged_decode|qk_norm|gemv" --launch-skip 300 -c 12 \
        python profile_step.py --batch-sizes 1 --capture-sizes 1 --num-gpu-blocks 256 --external
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterator
from contextlib import nullcontext

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from fullgraph import LLM, SamplingParams


def print_timeline(prof) -> None:
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"),
                     key=lambda e: e.time_range.start)
    names = [e.name[:60] for e in kernels]
    # a layer: [qkv GEMV, q/k kernel (unless fused),] decode attention, o, gate_up, down
    marks = [i for i, n in enumerate(names) if "paged_decode" in n]
    if len(marks) < 3:
        print("timeline: no per-layer decode attention kernel found")
        return
    period = marks[1] - marks[0]
    first = marks[0] - (2 if "qk_norm_rope" in names[marks[0] - 1] else 1)
    ends = [e.time_range.end for e in kernels]
    step = ends[-1] - kernels[0].time_range.start
    print(f"timeline: {len(kernels)} kernels, {step:.1f} us first start to last end, layer "
          f"period {period}, first layer kernel {first}")
    rows = []
    for j in range(period):
        idx = [first + layer * period + j for layer in range(len(marks))]
        idx = [i for i in idx if 0 < i < len(kernels)]
        durs = [kernels[i].time_range.elapsed_us() for i in idx]
        gaps = [ends[i] - ends[i - 1] for i in idx]
        # negative: the kernel started before its predecessor ended (PDL)
        starts = [kernels[i].time_range.start - ends[i - 1] for i in idx]
        rows.append((names[first + j], np.median(durs), np.median(gaps), np.median(starts),
                     len(idx)))
    for name, dur, gap, start, n in rows:
        print(f"  {name:60s} dur {dur:6.2f} us  end-to-end {gap:6.2f} us  start after "
              f"previous end {start:6.2f} us  (x{n})")
    # a hybrid's last period may be cut short (no layers after its last attention layer)
    tail = min(first + period * len(marks), len(kernels))
    print(f"  per layer: {sum(r[2] for r in rows):.2f} us; before the layers "
          f"{ends[first - 1] - kernels[0].time_range.start if first else 0.0:.1f} us, after "
          f"{ends[-1] - ends[tail - 1]:.1f} us")
    for i in range(first):
        print(f"  head {names[i]:55s} dur {kernels[i].time_range.elapsed_us():6.2f} "
              f"start at {kernels[i].time_range.start - kernels[0].time_range.start:6.2f}")
    for i in range(tail, len(kernels)):
        print(f"  tail {names[i]:55s} dur {kernels[i].time_range.elapsed_us():6.2f} "
              f"end-to-end {ends[i] - ends[i - 1]:6.2f}")


def print_idle(prof, steps: int, top: int) -> None:
    """GPU idle time over the profiled steps: the gaps where no kernel, copy or memset runs."""
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"),
                    key=lambda e: e.time_range.start)
    busy_end, gaps = events[0].time_range.end, []
    for prev, e in zip(events, events[1:]):
        if e.time_range.start > busy_end:
            gaps.append((e.time_range.start - busy_end, prev.name[:40], e.name[:40]))
        busy_end = max(busy_end, e.time_range.end)
    span = busy_end - events[0].time_range.start
    idle = sum(g[0] for g in gaps)
    print(f"idle: {steps} steps span {span:.1f} us ({span / steps:.1f} per step), GPU idle "
          f"{idle:.1f} us ({idle / steps:.1f} per step) in {len(gaps)} gaps; largest:")
    for dt, before, after in sorted(gaps, reverse=True)[:top]:
        print(f"  {dt:7.2f} us  after {before:40s} before {after}")


def random_prompts(rng: np.random.Generator, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` random token ids (below 50,000: inside the 0.6B preset's
    151,936-token vocabulary, not the tiny preset's)."""
    return [rng.integers(0, 50000, length).tolist() for _ in range(count)]


def start_decoding(engine, prompts: list[list[int]], params: SamplingParams, tag: str,
                   steady_steps: int = 3) -> None:
    """Add a request per prompt, step until every one of them decodes, then `steady_steps`
    more (steady decode steps)."""
    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", ids, params)
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_tokens - 1
                                          for r in engine.scheduler.running):
        engine.step()
    for _ in range(steady_steps):
        engine.step()


def drain(engine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def decoding_batches(engine, batch_sizes: list[int], input_len: int, max_tokens: int,
                     tag: str) -> Iterator[int]:
    """For each batch size: that many random prompts of `input_len` tokens (the same ones in
    every probe), started and decoding steadily (greedy, `max_tokens` each, `start_decoding`);
    yields the size, then finishes them."""
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for b in batch_sizes:
        start_decoding(engine, random_prompts(rng, b, input_len), params, f"{tag}{b}")
        yield b
        drain(engine)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-0.6b-random")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--capture-sizes", type=int, nargs="*", default=[1, 32],
                   help="none given: the engine's default sizes")
    p.add_argument("--cudagraph-mode", default="full_decode_only")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--timeline", action="store_true")
    p.add_argument("--steps", type=int, default=1, help="steps profiled in a row")
    p.add_argument("--variant", help="decode_variants.py's edits, e.g. fuse+splits=8")
    p.add_argument("--num-gpu-blocks", type=int,
                   help="KV blocks (small under ncu: it saves and restores device memory)")
    p.add_argument("--batch-invariant", action="store_true", help="the batch-invariant mode")
    p.add_argument("--speculative-config", type=json.loads, default=None,
                   help="speculative decoding, as the CLI spells it (JSON)")
    p.add_argument("--external", action="store_true",
                   help="only run the steps, for a profiler outside (ncu, nsys)")
    a = p.parse_args()
    if a.variant:
        from decode_variants import apply     # this directory's probe
        apply(a.variant)
    sizes = {"cudagraph_capture_sizes": a.capture_sizes} if a.capture_sizes else {}
    if a.num_gpu_blocks:
        sizes["num_gpu_blocks_override"] = a.num_gpu_blocks
    llm = LLM(a.model, cudagraph_mode=a.cudagraph_mode, batch_invariant=a.batch_invariant,
              speculative_config=a.speculative_config, **sizes)
    engine = llm.engine
    for b in decoding_batches(engine, a.batch_sizes, a.input_len, 64, "p"):
        torch.cuda.synchronize()
        with nullcontext() if a.external else profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                engine.step()
            torch.cuda.synchronize()
        if a.external:
            continue
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
        if a.timeline:
            print_timeline(prof)
        if a.steps > 1:
            print_idle(prof, a.steps, a.top)
    from torch._dynamo.utils import counters
    print("\ngraph breaks:", dict(counters["graph_break"]))
    print("stats:", dict(counters["stats"]))


if __name__ == "__main__":
    main()
