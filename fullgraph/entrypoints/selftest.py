"""`fullgraph selftest`: check on this machine that graph replay and eager agree.

Random batches (mixed prompt lengths, chunked prefill, padding lanes, greedy and seeded
sampling) run through two engines on the same model, one replaying CUDA graphs and one
eager; every request must produce the same tokens. On a machine without CUDA the graph engine
uses the fake graph runtime (same capture/replay semantics on the CPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import time

import torch

from fullgraph.entrypoints.cli_args import add_engine_args, engine_args_from
from fullgraph.sampling_params import SamplingParams


# One model of each cache kind (paged KV only, and paged KV with linear-attention state), and
# a vision-language model (images in some prompts: eager image steps, graph decode steps).
DEFAULT_MODELS = ("tiny-qwen3", "tiny-qwen3.5", "tiny-qwen3-vl")


def add_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.set_defaults(model=None)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--selftest-seed", type=int, default=0)


def random_batch(rng: random.Random, vocab: int, max_len: int, max_seqs: int,
                 image_placeholders: list[int] | None = None):
    """Random prompts (ids below `vocab`); with `image_placeholders` (a multimodal model's
    tokens for one image), about half of them get one or two random images first."""
    import numpy as np
    n = rng.randrange(1, max_seqs + 1)
    prompts = []
    for _ in range(n):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, max_len))]
        if image_placeholders and rng.random() < 0.5:
            k = rng.randrange(1, 3)
            images = [np.random.default_rng(rng.randrange(1 << 30)).integers(
                0, 256, (rng.randrange(32, 160), rng.randrange(32, 160), 3), dtype=np.uint8)
                for _ in range(k)]
            prompts.append({"prompt_token_ids": image_placeholders * k + ids,
                            "multi_modal_data": {"image": images}})
        else:
            prompts.append({"prompt_token_ids": ids})
    params = [SamplingParams(temperature=rng.choice([0.0, 0.0, 0.8]), top_p=rng.choice([1.0, 0.9]),
                             seed=rng.randrange(1 << 30), max_tokens=rng.randrange(2, 24),
                             ignore_eos=True) for _ in range(n)]
    return prompts, params


def main(ns: argparse.Namespace) -> int:
    """Every model given (default: `DEFAULT_MODELS`); 0 if all pass."""
    models = [ns.model] if ns.model else DEFAULT_MODELS
    failed = [m for m in models if check_model(dataclasses.replace(engine_args_from(ns),
                                                                    model=m), ns) != 0]
    if len(models) > 1:
        print(f"{'FAIL' if failed else 'PASS'}: {len(models) - len(failed)}/{len(models)} models")
    return 1 if failed else 0


def check_model(base, ns: argparse.Namespace) -> int:
    from fullgraph.entrypoints.llm import LLM
    cuda = torch.cuda.is_available() and base.device != "cpu"
    base = dataclasses.replace(
        base, max_model_len=base.max_model_len or 512, max_num_seqs=min(base.max_num_seqs, 16),
        max_num_batched_tokens=base.max_num_batched_tokens or 128,
        num_gpu_blocks_override=base.num_gpu_blocks_override or 1024,
        cudagraph_capture_sizes=base.cudagraph_capture_sizes or [1, 2, 4, 8, 16, 32, 64, 128])
    t0 = time.perf_counter()
    graph = LLM(**dataclasses.asdict(dataclasses.replace(
        base, enforce_eager=False, cudagraph_runtime="cuda" if cuda else "fake")))
    eager = LLM(**dataclasses.asdict(dataclasses.replace(base, enforce_eager=True)))
    print(f"{base.model}: engines ready in {time.perf_counter() - t0:.1f} s on "
          f"{graph.engine.config.device} "
          f"({graph.engine.runner.capture_report.num_graphs} "
          f"{'CUDA graphs' if cuda else 'emulated graphs'})")
    rng = random.Random(ns.selftest_seed)
    mm = graph.engine.mm_processor
    placeholders = mm.placeholder_ids if mm is not None else None
    # random ids stay below the image tokens (they would be placeholders without images)
    vocab = min(graph.engine.config.model.vocab_size, 50000, *(placeholders or ()))
    mismatches = total = 0
    for trial in range(ns.trials):
        prompts, params = random_batch(rng, vocab, 100, base.max_num_seqs, placeholders)
        a = graph.generate(prompts, params, use_tqdm=False)
        b = eager.generate(prompts, params, use_tqdm=False)
        bad = sum(x.outputs[0].token_ids != y.outputs[0].token_ids for x, y in zip(a, b))
        mismatches += bad
        total += len(prompts)
        print(f"trial {trial}: {len(prompts)} requests, {bad} mismatched")
    runner = graph.engine.runner
    ok = mismatches == 0 and runner.dispatcher.num_graph_steps > 0
    print(f"{'PASS' if ok else 'FAIL'}: {total - mismatches}/{total} requests identical; "
          f"{runner.dispatcher.num_graph_steps} graph replays, "
          f"{runner.dispatcher.num_eager_fallbacks} eager fallbacks")
    return 0 if ok else 1
