"""Sampler cost per call, old (HEAD before issue 22: every feature for every row, chunks of
16, sort + int64 hash noise) vs new (worker/sampler.py + layers/sampling.py), at 1 / 32 /
256 rows of a 151,936 vocabulary in bf16, for each feature set. Each call is captured in a
CUDA graph and replayed, as the runner does; ms per replay from CUDA events.

    python benchmarks/probes/sampler_bench.py [--rows 1 32 256] [--iters 50]
        [--draw-programs 528 2112] [--draw-blocks 1024 4096]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

from graph_timing import replay_ms  # noqa: E402  (this folder, sys.path[0] when run)

from fullgraph.layers import sampling  # noqa: E402
from fullgraph.layers.argmax import argmax_rows  # noqa: E402
from fullgraph.worker.sampler import (ALL_FEATURES, SamplerFeatures, SamplingState,  # noqa: E402
                                      SamplingTensors, sample)

V = 151_936
_M32, _MUL, _GOLDEN, _CHUNK = 0xFFFFFFFF, 0x45D9F3B, 0x9E3779B1, 16


# ------------------------------------------------------------------ the old sampler (HEAD)
def _mix32(x):
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    return x ^ (x >> 16)


def _old_noise(seeds, positions, v):
    positions = positions.to(torch.int64)
    h = _mix32((seeds & _M32) ^ _mix32(((seeds >> 32) & _M32) ^ _mix32(positions & _M32)))
    ids = torch.arange(v, device=seeds.device, dtype=torch.int64)
    x = _mix32((h[:, None] + ids[None, :] * _GOLDEN) & _M32)
    return ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))


def _old_top_k_top_p(logits, top_k, top_p):
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    drop = ranks[None, :] >= top_k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    drop |= (probs.cumsum(dim=-1) - probs) > top_p[:, None]
    kept = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, kept)


def _old_rows(logits, t, num_logprobs):
    greedy = argmax_rows(logits)
    temp = torch.where(t.temperature > 0, t.temperature, torch.ones_like(t.temperature))
    scaled = _old_top_k_top_p(logits / temp[:, None], t.top_k, t.top_p)
    gumbel = -torch.log(-torch.log(_old_noise(t.seeds, t.positions, logits.shape[-1])))
    token_ids = torch.where(t.temperature > 0, argmax_rows(scaled + gumbel), greedy)
    logp = logits.log_softmax(dim=-1)
    chosen = logp.gather(-1, token_ids[:, None])
    ranks = (logp > chosen).sum(dim=-1) + 1
    top_lp, top_ids = logp.topk(num_logprobs, dim=-1)
    return token_ids, torch.cat([chosen, top_lp], -1), top_ids, ranks


def old_sample(logits, t, num_logprobs=20):
    outs = [_old_rows(logits[lo:lo + _CHUNK].float(), t.rows(lo, lo + _CHUNK), num_logprobs)
            for lo in range(0, logits.shape[0], _CHUNK)]
    return [torch.cat(p) for p in zip(*outs)]


# ------------------------------------------------------------------ harness
def make_inputs(rows, case, device, gen):
    """Logits shaped like a model's: a few high values over a broad low bulk."""
    logits = torch.randn(rows, V, generator=gen, device=device) * 2.0
    peaks = torch.randint(0, V, (rows, 32), generator=gen, device=device)
    logits.scatter_(1, peaks, 8.0 + 4 * torch.rand(rows, 32, generator=gen, device=device))
    logits = logits.to(torch.bfloat16)
    temp = {"greedy": 0.0}.get(case, 0.6 if case != "top_p" else 1.0)
    top_k = {"top_k_top_p": 20, "all": 20}.get(case, V)
    top_p = {"top_k_top_p": 0.95, "top_p": 0.9, "all": 0.95}.get(case, 1.0)
    min_p = {"min_p": 0.05, "all": 0.05}.get(case, 0.0)
    t = SamplingTensors(
        temperature=torch.full((rows,), temp, device=device),
        top_k=torch.full((rows,), top_k, dtype=torch.int32, device=device),
        top_p=torch.full((rows,), top_p, device=device),
        seeds=torch.randint(0, 2 ** 62, (rows,), generator=gen, device=device),
        positions=torch.randint(0, 4096, (rows,), generator=gen, device=device),
        all_greedy=temp == 0.0, any_top_k_top_p=top_k < V or top_p < 1.0 or min_p > 0,
        num_logprobs=20 if case in ("logprobs", "all") else -1,
        min_p=torch.full((rows,), min_p, device=device) if min_p else None)
    state = None
    if case in ("penalties", "all"):
        state = SamplingState.allocate(rows, V, device)
        for r in range(rows):
            state.reset_slot(r, prompt_token_ids=list(range(r, 3000 + r)),
                             output_token_ids=list(range(0, 500)), repetition_penalty=1.1,
                             frequency_penalty=0.2, presence_penalty=0.1)
        t.state_slots = torch.arange(rows, dtype=torch.int32, device=device)
    feats = {
        "greedy": SamplerFeatures(),
        "temperature": SamplerFeatures(sample=True),
        "top_k_top_p": SamplerFeatures(sample=True, filter=True),
        "top_p": SamplerFeatures(sample=True, filter=True),
        "min_p": SamplerFeatures(sample=True, filter=True),
        "penalties": SamplerFeatures(sample=True, process=True),
        "logprobs": SamplerFeatures(sample=True, logprobs=True),
        "all": ALL_FEATURES,
    }[case]
    return logits, t, feats, state


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--cases", nargs="+", default=["greedy", "temperature", "top_k_top_p", "top_p",
                                                   "min_p", "penalties", "logprobs", "all"])
    ap.add_argument("--no-old", action="store_true")
    ap.add_argument("--profile", nargs="*", default=[], metavar="CASE",
                    help="then each CASE's kernels at each row count (torch.profiler)")
    ap.add_argument("--draw-programs", type=int, nargs="+", default=[sampling.TARGET_PROGRAMS],
                    help="the drawing pass's program budget (layers/sampling.py), each in turn")
    ap.add_argument("--draw-blocks", type=int, nargs="+", default=[sampling.DRAW_BLOCK],
                    help="the drawing pass's block, each in turn (with each program budget)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  vocab {V}  bf16 logits  "
          "ms per call (CUDA graph replay)")
    print(f"{'case':<14}" + "".join(f"{'rows ' + str(r):>22}" for r in args.rows))
    print(f"{'':<14}" + "".join(f"{'old':>11}{'new':>11}" for _ in args.rows))
    sweep = len(args.draw_programs) * len(args.draw_blocks) > 1
    for case, programs, block in ((c, p, b) for p in args.draw_programs
                                  for b in args.draw_blocks for c in args.cases):
        sampling.TARGET_PROGRAMS, sampling.DRAW_BLOCK = programs, block
        line = f"{case[:4]:<4}{programs:>5}{block:>5}" if sweep else f"{case:<14}"
        for rows in args.rows:
            logits, t, feats, state = make_inputs(rows, case, dev, gen)
            with torch.inference_mode():
                new = replay_ms(lambda: sample(logits, t, feats, state), args.iters)
                if args.no_old:
                    old = float("nan")
                elif case == "greedy":
                    old = replay_ms(lambda: argmax_rows(logits), args.iters)
                else:
                    old = replay_ms(lambda: old_sample(logits, t), args.iters)
            line += f"{old:>11.3f}{new:>11.3f}"
        print(line, flush=True)
    for case, rows in ((c, r) for c in args.profile for r in args.rows):
        logits, t, feats, state = make_inputs(rows, case, dev, gen)
        with torch.inference_mode():
            for _ in range(3):
                sample(logits, t, feats, state)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
                for _ in range(10):
                    sample(logits, t, feats, state)
                torch.cuda.synchronize()
        print(f"--- {case}, {rows} rows: kernels over 10 eager calls")
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)


if __name__ == "__main__":
    main()
