"""`fullgraph bench throughput`: offline generation of many requests, output tokens/s.

Default workload: 256 requests with prompt and output lengths drawn uniformly from
100..1024, ignore_eos (every request produces its full output). It runs twice on the same
engine, greedy and sampled (nano-vllm's benchmark samples at temperature 0.6, as real and RL
users do), and reports both side by side: `--temperature 0` runs greedy alone. With
`--compare-batch-invariant` the workload runs again in the batch-invariant mode
(docs/batch_invariance.md), in the same process, and each setting reports the ratio.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import time

import numpy as np
import torch

from fullgraph.entrypoints.bench.common import (copy_bandwidth, header, pyplot, random_prompt,
                                                write_json)
from fullgraph.entrypoints.cli_args import add_engine_args, engine_args_from
from fullgraph.sampling_params import SamplingParams


def add_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.set_defaults(model="qwen3-0.6b-random")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.6,
                   help="the sampled run's temperature (0: the greedy run only)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--workload-seed", type=int, default=0)
    p.add_argument("--compare-batch-invariant", action="store_true",
                   help="run the workload in the normal and then the batch-invariant mode "
                        "and report the ratio")
    p.add_argument("--out", default="bench_out")


def run(engine, in_lens, out_lens, rng, vocab: int, params: dict) -> dict:
    for i, (n_in, n_out) in enumerate(zip(in_lens, out_lens)):
        engine.add_request(f"tp-{params['temperature']}-{i}",
                           random_prompt(engine, rng, n_in, vocab),
                           SamplingParams(max_tokens=int(n_out), ignore_eos=True, seed=i,
                                          **params))
    timeline, generated = [], 0
    preempt0 = engine.scheduler.num_preemptions
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        g0 = engine.stats.generation_tokens
        engine.step()
        generated += engine.stats.generation_tokens - g0
        timeline.append((time.perf_counter() - t0, generated, len(engine.scheduler.running)))
    elapsed = time.perf_counter() - t0
    return {"sampling": params, "seconds": elapsed,
            "output_tokens_per_s": int(out_lens.sum()) / elapsed,
            "total_tokens_per_s": int(in_lens.sum() + out_lens.sum()) / elapsed,
            "steps": len(timeline), "preemptions": engine.scheduler.num_preemptions - preempt0,
            "timeline": timeline}


def main(ns: argparse.Namespace) -> int:
    if not ns.compare_batch_invariant:
        data = measure(ns)
    else:                     # the same workload in both modes, one engine after the other
        data, invariant = (measure(argparse.Namespace(**{**vars(ns), "batch_invariant": on}))
                           for on in (False, True))
        data["batch_invariant_runs"] = invariant["runs"]
        for normal, inv in zip(data["runs"], invariant["runs"]):
            inv["over_normal_tokens_per_s"] = (inv["output_tokens_per_s"]
                                               / normal["output_tokens_per_s"])
            print(f"batch-invariant {inv['sampling']}: {inv['over_normal_tokens_per_s']:.2f}x "
                  f"the normal mode's output tokens/s")
    path = write_json(ns.out, "bench_throughput.json", data)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, runs in (("", data["runs"]),
                        ("batch-invariant ", data.get("batch_invariant_runs", []))):
        for r in runs:
            ts = [t for t, _, _ in r["timeline"]]
            ax.plot(ts, [g / 1e3 for _, g, _ in r["timeline"]],
                    label=f"{label}{r['sampling']}: {r['output_tokens_per_s']:.0f} tok/s")
    ax.set(xlabel="seconds", ylabel="output tokens (thousands)",
           title=f"{ns.model} on {data['device']}")
    ax.legend(fontsize=7)
    fig.savefig(os.path.splitext(path)[0] + ".png", dpi=120, bbox_inches="tight")
    print(f"wrote {path}")
    return 0


def measure(ns: argparse.Namespace) -> dict:
    """The workload through one engine, greedy then sampled: the report's data."""
    from fullgraph.entrypoints.llm import LLM
    args = engine_args_from(ns)
    args = dataclasses.replace(args, max_model_len=args.max_model_len or 2 * ns.max_len + 16)
    llm = LLM(**dataclasses.asdict(args))
    engine = llm.engine
    if engine.config.device == "cpu" and ns.num_prompts * ns.max_len > 32 * 256:
        print("on the CPU a workload this size takes minutes (a quick CPU run: --model "
              "tiny-qwen3 --num-prompts 32 --max-len 256 --num-gpu-blocks-override 4096)")
    rng = np.random.default_rng(ns.workload_seed)
    vocab = min(engine.config.model.vocab_size, 50000)
    in_lens = rng.integers(ns.min_len, ns.max_len + 1, ns.num_prompts)
    out_lens = rng.integers(ns.min_len, ns.max_len + 1, ns.num_prompts)
    sampled = {"temperature": ns.temperature, "top_p": ns.top_p, "top_k": ns.top_k}
    settings = [{"temperature": 0.0}] + ([sampled] if ns.temperature > 0 else [])
    # warm up the shapes the runs will hit, full token-budget prefill steps included
    # (compiles happen here, not in the first timed run)
    warm_len = min(ns.max_len, engine.config.model.max_model_len - 9)
    warm_n = max(8, 2 * engine.config.scheduler.max_num_batched_tokens // warm_len)
    for params in settings:
        llm.generate([{"prompt_token_ids": random_prompt(engine, rng, warm_len, vocab)}
                      for _ in range(warm_n)],
                     SamplingParams(max_tokens=8, **params), use_tqdm=False)
    runs = []
    for params in settings:     # the same workload (same prompts) for each
        runs.append(run(engine, in_lens, out_lens, np.random.default_rng(ns.workload_seed + 1),
                        vocab, params))
        print(f"{params}: {runs[-1]['output_tokens_per_s']:.0f} output tokens/s "
              f"({int(out_lens.sum())} tokens in {runs[-1]['seconds']:.1f} s, "
              f"{runs[-1]['preemptions']} preemptions)", flush=True)
    device = torch.device(engine.config.device)
    data = header(device) | {
        "model": ns.model, "num_prompts": ns.num_prompts, "prompt_tokens": int(in_lens.sum()),
        "output_tokens": int(out_lens.sum()), "runs": runs,
        "kv_blocks": engine.config.cache.num_blocks,
        "graph_steps": engine.runner.dispatcher.num_graph_steps,
        "eager_fallbacks": engine.runner.dispatcher.num_eager_fallbacks,
        "copy_bandwidth_GBps": copy_bandwidth(device) / 1e9}
    if len(runs) == 2:
        data["sampled_over_greedy"] = (runs[1]["output_tokens_per_s"]
                                       / runs[0]["output_tokens_per_s"])
        print(f"sampled / greedy: {data['sampled_over_greedy']:.1%}")
    del llm, engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return data
