"""Probe: batch-1 decode ms/step of successive requests in one engine, with an action
between them (a lead from the eighth session: in FULL mode decode steps ran ~3% slower
until the first eager model step after capture; docs/benchmarks.md).

    python benchmarks/probes/request_sequence.py 512 512 alloc 512 600 512
    python benchmarks/probes/request_sequence.py 512 gemm 512 gemv 512 512:eager 512

Each number is a request with that prompt length (a prompt longer than the largest capture
size prefills eagerly); `N:eager` runs that request's first decode step eagerly before the
timing. Actions between requests, to find what an eager step does that matters: `alloc`
allocates, fills and frees 2 GiB; `empty_cache` empties the caching allocator; `gemm` runs a
600-row bf16 cuBLAS matmul; `add` a torch elementwise kernel; `triton` / `triton_pdl` a
trivial Triton kernel launched without / with PDL; `gemv` our one-row Triton GEMV (a PDL
kernel), all outside a graph. Prints each
request's decode ms/step (3 x 40 steps, synchronized), its KV blocks, and the engine's eager
fallbacks so far.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from graph_timing import step_ms   # this folder, sys.path[0] when run

from fullgraph import LLM, SamplingParams
from fullgraph.config import CUDAGraphMode
from fullgraph.layers.gemv import gemv
from fullgraph.worker.cudagraph.descriptor import BatchExecutionDescriptor

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _fill_kernel(out_ptr, n, USE_PDL: tl.constexpr):
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        offs = tl.program_id(0) * 1024 + tl.arange(0, 1024)
        tl.store(out_ptr + offs, 1.0, mask=offs < n)
except ImportError:
    triton = None


def action(name: str) -> None:
    kw = dict(device="cuda", dtype=torch.bfloat16)
    if name == "alloc":
        x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
        x.fill_(0)
        del x
    elif name == "empty_cache":
        torch.cuda.empty_cache()
    elif name == "gemm":
        torch.randn(600, 1024, **kw) @ torch.randn(1024, 6144, **kw)
    elif name == "add":
        torch.ones(1 << 20, device="cuda").add_(1)
    elif name in ("triton", "triton_pdl"):
        out = torch.empty(1 << 20, device="cuda")
        pdl = name == "triton_pdl"
        _fill_kernel[(out.numel() // 1024,)](out, out.numel(), USE_PDL=pdl, launch_pdl=pdl)
    elif name == "gemv":
        gemv(torch.randn(1, 1024, **kw), torch.randn(4096, 1024, **kw))
    else:
        raise SystemExit(f"unknown action {name!r}")
    torch.cuda.synchronize()


def eager_once(dispatcher) -> None:
    """The dispatcher's next step runs eagerly (no graph), then it dispatches as before."""
    dispatch = dispatcher.dispatch

    def once(num_tokens: int, num_reqs: int, uniform_query_len: int | None):
        dispatcher.dispatch = dispatch
        return BatchExecutionDescriptor(CUDAGraphMode.NONE, num_tokens, num_reqs,
                                        uniform_query_len)
    dispatcher.dispatch = once


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-0.6b-random")
    p.add_argument("--cudagraph-mode", default="full")
    p.add_argument("sequence", nargs="+")
    a = p.parse_args()
    engine = LLM(a.model, cudagraph_mode=a.cudagraph_mode, enable_prefix_caching=False).engine
    rng = np.random.default_rng(0)
    vocab = min(50000, engine.runner.model.config.vocab_size)

    def ms_per_step(n: int = 40) -> float:
        return step_ms(engine, n)

    for item in a.sequence:
        prompt_len, _, then = item.partition(":")
        if not prompt_len.isdigit():
            action(item)
            continue
        engine.add_request(f"r{item}-{rng.integers(1 << 30)}",
                           rng.integers(0, vocab, int(prompt_len)).tolist(),
                           SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True))
        engine.step()
        if then == "eager":
            eager_once(engine.runner.dispatcher)
        engine.step()
        blocks = engine.scheduler.running[0].block_ids
        times = [round(ms_per_step(), 4) for _ in range(3)]
        print(f"prompt {item}: {times} ms/step, blocks {blocks[0]}..{blocks[-1]}, eager "
              f"fallbacks {engine.runner.dispatcher.num_eager_fallbacks}", flush=True)
        while engine.has_unfinished_requests():
            engine.step()


if __name__ == "__main__":
    main()
