"""`fullgraph bench throughput`: offline generation of many requests, output tokens/s.

Default workload: 256 requests with prompt and output lengths drawn uniformly from
100..1024, ignore_eos (every request produces its full output), greedy.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np
import torch

from fullgraph.entrypoints.bench.common import copy_bandwidth, header, pyplot, write_json
from fullgraph.entrypoints.cli_args import add_engine_args, engine_args_from
from fullgraph.sampling_params import SamplingParams


def add_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.set_defaults(model="qwen3-0.6b-random")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--workload-seed", type=int, default=0)
    p.add_argument("--out", default="bench_out")


def main(ns: argparse.Namespace) -> int:
    from fullgraph.entrypoints.llm import LLM
    args = engine_args_from(ns)
    args = dataclasses.replace(args, max_model_len=args.max_model_len or 2 * ns.max_len + 16)
    llm = LLM(**dataclasses.asdict(args))
    engine = llm.engine
    rng = np.random.default_rng(ns.workload_seed)
    vocab = min(engine.config.model.vocab_size, 50000)
    in_lens = rng.integers(ns.min_len, ns.max_len + 1, ns.num_prompts)
    out_lens = rng.integers(ns.min_len, ns.max_len + 1, ns.num_prompts)
    # warm up the shapes the run will hit (compiles happen here, not in the timed run)
    llm.generate([{"prompt_token_ids": rng.integers(0, vocab, 64).tolist()}] * 8,
                 SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    for i, (n_in, n_out) in enumerate(zip(in_lens, out_lens)):
        engine.add_request(f"tp-{i}", rng.integers(0, vocab, n_in).tolist(),
                           SamplingParams(temperature=ns.temperature, max_tokens=int(n_out),
                                          ignore_eos=True, seed=i))
    timeline = []
    t0 = time.perf_counter()
    generated = 0
    while engine.has_unfinished_requests():
        g0 = engine.stats.generation_tokens
        engine.step()
        generated += engine.stats.generation_tokens - g0
        timeline.append((time.perf_counter() - t0, generated, len(engine.scheduler.running)))
    elapsed = time.perf_counter() - t0
    device = torch.device(engine.config.device)
    data = header(device) | {
        "model": ns.model, "num_prompts": ns.num_prompts, "prompt_tokens": int(in_lens.sum()),
        "output_tokens": int(out_lens.sum()), "seconds": elapsed,
        "output_tokens_per_s": int(out_lens.sum()) / elapsed,
        "total_tokens_per_s": int(in_lens.sum() + out_lens.sum()) / elapsed,
        "steps": len(timeline), "preemptions": engine.scheduler.num_preemptions,
        "kv_blocks": engine.config.cache.num_blocks,
        "graph_steps": engine.runner.dispatcher.num_graph_steps,
        "eager_fallbacks": engine.runner.dispatcher.num_eager_fallbacks,
        "copy_bandwidth_GBps": copy_bandwidth(device) / 1e9}
    path = write_json(ns.out, "bench_throughput.json", data)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ts = np.array([t for t, _, _ in timeline])
    gen = np.array([g for _, g, _ in timeline])
    ax.plot(ts, gen / 1e3, label="output tokens (k)")
    ax2 = ax.twinx()
    ax2.plot(ts, [r for _, _, r in timeline], color="tab:orange", alpha=0.6, label="running requests")
    ax.set(xlabel="seconds", ylabel="output tokens (thousands)",
           title=f"{data['output_tokens_per_s']:.0f} output tokens/s on {data['device']}")
    ax2.set_ylabel("running requests")
    fig.savefig(os.path.splitext(path)[0] + ".png", dpi=120, bbox_inches="tight")
    print(f"{data['output_tokens_per_s']:.0f} output tokens/s ({data['output_tokens']} tokens in "
          f"{elapsed:.1f} s, {data['preemptions']} preemptions); wrote {path}")
    return 0
