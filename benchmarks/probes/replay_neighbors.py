"""Probe: does what the host launches next to a graph replay change how fast the graph runs?

    python benchmarks/probes/replay_neighbors.py --batch-sizes 1 8 --replays 200 --rounds 3

In the model, a decode graph ran at another speed when an eager PDL kernel was launched just
before each replay (H100: batch 1 0.785 with, 0.821 ms/step without; batch 8 1.323 with,
1.252 without; docs/benchmarks.md, eleventh session), and the torch profiler hides the
difference. This replays one decode graph directly (the same inputs every time: a fixed
context) with different launches around each replay, keeping at most `--in-flight`
replays queued as the engine does (it waits for step N - 1 before launching step N + 1),
and prints µs per replay measured with CUDA events. Variants are interleaved round by
round, in one engine.

  none          the replay alone
  pdl_before    a 1-program PDL Triton kernel (layers/pdl.py's mark kernel) before it
  plain_before  the same kernel launched without PDL
  fill_before   a torch fill kernel before it
  copy_before   a 64-byte pinned host -> device copy-engine copy before it
  pdl_after     the mark kernel after it, as the engine's samples copy comes after
"""
from __future__ import annotations

import argparse
import statistics

import torch

from fullgraph import LLM
from fullgraph.layers import pdl
from profile_step import decoding_batches   # this directory's probe

VARIANTS = ("none", "pdl_before", "plain_before", "fill_before", "copy_before", "pdl_after")


def neighbors(device: torch.device) -> dict:
    flag = torch.zeros(16, dtype=torch.int32, device=device)
    host = torch.zeros(16, dtype=torch.int32, pin_memory=True)

    def mark(use_pdl: bool):
        return lambda: pdl._mark_kernel[(1,)](flag, launch_pdl=use_pdl)

    nothing = lambda: None                                            # noqa: E731
    return {"none": (nothing, nothing), "pdl_before": (mark(True), nothing),
            "plain_before": (mark(False), nothing), "fill_before": (lambda: flag.fill_(1), nothing),
            "copy_before": (lambda: flag.copy_(host, non_blocking=True), nothing),
            "pdl_after": (nothing, mark(True))}


def us_per_replay(replay, before, after, replays: int, in_flight: int) -> float:
    done = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        if len(done) >= in_flight:
            done.pop(0).synchronize()
        before()
        replay()
        after()
        e = torch.cuda.Event()
        e.record()
        done.append(e)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-0.6b-random")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--replays", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--in-flight", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    a = p.parse_args()
    llm = LLM(a.model, cudagraph_mode="full_decode_only", cudagraph_capture_sizes=a.batch_sizes,
              max_num_seqs=max(a.batch_sizes))
    engine, runner = llm.engine, llm.engine.runner
    around = neighbors(runner.device)
    # steady decode steps first: the graph's inputs are a real step's
    for b in decoding_batches(engine, a.batch_sizes, a.input_len, 16, "r"):
        desc = runner.dispatcher.dispatch(b, b, 1)
        replay = lambda desc=desc: runner.graphs.replay(desc)          # noqa: E731
        results: dict[str, list[float]] = {v: [] for v in a.variants}
        for _ in range(a.rounds):
            for v in a.variants:
                before, after = around[v]
                results[v].append(us_per_replay(replay, before, after, a.replays, a.in_flight))
        print(f"batch {b}: µs per replay, median of {a.rounds} rounds (all rounds)")
        for v, us in results.items():
            print(f"  {v:14s} {statistics.median(us):8.1f}   "
                  + " ".join(f"{x:.1f}" for x in us))


if __name__ == "__main__":
    main()
