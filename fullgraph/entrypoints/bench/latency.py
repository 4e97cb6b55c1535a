"""`fullgraph bench latency`: decode ms/step and time to first token, eager vs CUDA graphs.

For each batch size, B requests of `--input-len` random tokens generate `--output-len`
tokens each (greedy, ignore_eos). Decode steps (every request decoding) are timed one by
one; the step ends with the copy of sampled ids to the host, so wall time is device time
plus host overhead. Achieved bandwidth counts the bytes a decode step must read: the weights
(tied LM head once), each request's KV cache and, for hybrid models, each request's
linear-attention state (read and written); the floor is those bytes at the device's measured
copy bandwidth.

With `--speculative-config`, a decode step emits up to k + 1 tokens a request: each row also
reports output tokens/s over the decode steps and the mean accepted length (tokens a
request gains per verify step), and the same batches run once more without speculation in
the same process, for the speedup. With `--compare-batch-invariant`, each mode runs in the
normal mode and then in the batch-invariant mode (docs/batch_invariance.md), in the same
process, and each row reports the invariant mode's ms/step and TTFT over the normal mode's.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import time
import warnings

import numpy as np
import torch

from fullgraph.config import CUDAGraphMode
from fullgraph.entrypoints.bench.common import (copy_bandwidth, header, pyplot, random_prompt,
                                                write_json)
from fullgraph.entrypoints.cli_args import add_engine_args, engine_args_from
from fullgraph.sampling_params import SamplingParams


def add_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.set_defaults(model="qwen3-0.6b-random")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--modes", nargs="+", default=["graph", "eager"], choices=["graph", "eager"])
    p.add_argument("--compare-batch-invariant", action="store_true",
                   help="run each mode in the normal and then the batch-invariant mode and "
                        "report the ratio")
    p.add_argument("--out", default="bench_out")


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def count_kernels(engine, batch: int) -> int | None:
    """CUDA kernels launched by one decode step at this batch size (graph or eager)."""
    from torch.profiler import ProfilerActivity, profile
    if not torch.cuda.is_available():
        engine.step()
        return None
    torch.cuda.synchronize()          # with async scheduling a step is in flight
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA"
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower())


def count_syncs(engine) -> int | None:
    """GPU->CPU synchronizations torch reports during one engine step (its sampled tokens'
    wait is an event, which is not one of them): 0 is the design."""
    if not torch.cuda.is_available():
        engine.step()
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) and "prototype" not in str(w.message)
               for w in caught)


def bench_batch(engine, batch: int, input_len: int, output_len: int, rng) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    vocab = engine.config.model.vocab_size
    for i in range(batch):
        ids = random_prompt(engine, rng, input_len, min(vocab, 50000))
        engine.add_request(f"lat-{batch}-{i}-{time.monotonic_ns()}", ids, params)
    t0 = time.perf_counter()
    ttft, decode_ms, kernels, prep, counted = None, [], None, None, False
    decode_tokens = 0
    stats = engine.stats
    drafts0, accepted0 = stats.spec_num_drafts, stats.spec_num_accepted_tokens
    runner = engine.runner
    prefill_syncs = count_syncs(engine)          # the first step: the prompts' prefill
    decode_syncs = None
    if all(r.output_token_ids for r in engine.requests.values()):
        ttft = time.perf_counter() - t0
    while engine.has_unfinished_requests():
        sched_decode = all(r.num_tokens + r.num_pending - r.num_computed_tokens == 1
                           for r in engine.scheduler.running) and not engine.scheduler.waiting
        if sched_decode and not counted and ttft is not None:
            kernels, counted = count_kernels(engine, batch), True
            decode_syncs = count_syncs(engine)
            continue
        p0, n0 = runner.prepare_seconds, runner.num_steps
        s0 = runner.state_prepare_seconds
        g0 = stats.generation_tokens
        t = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t
        if sched_decode and ttft is not None:
            decode_ms.append(dt * 1e3)
            decode_tokens += stats.generation_tokens - g0
            steps = max(runner.num_steps - n0, 1)
            prep = (prep or []) + [((runner.prepare_seconds - p0) / steps,
                                    (runner.state_prepare_seconds - s0) / steps)]
        elif ttft is None and all(r.output_token_ids for r in engine.requests.values()):
            ttft = time.perf_counter() - t0
    if not decode_ms:                            # a warm-up too short to time a decode step
        decode_ms = [float("nan")]
    drafts = stats.spec_num_drafts - drafts0
    return {"batch": batch, "ttft_ms": (ttft or 0) * 1e3,
            "output_tok_per_s": decode_tokens / (sum(decode_ms) / 1e3) if decode_tokens else None,
            "mean_accepted_len": (1 + (stats.spec_num_accepted_tokens - accepted0) / drafts
                                  if drafts else None),
            "decode_ms_median": statistics.median(decode_ms), "decode_ms_mean": statistics.fmean(decode_ms),
            "decode_steps": len(decode_ms), "kernels_per_decode_step": kernels,
            "syncs_prefill_step": prefill_syncs, "syncs_decode_step": decode_syncs,
            "prepare_us_per_step": 1e6 * statistics.median(p for p, _ in prep) if prep else None,
            # of which the linear-attention layers' metadata (chunk maps; hybrids only)
            "state_prepare_us_per_step":
                1e6 * statistics.median(q for _, q in prep) if prep else None}


def run_mode(ns, mode: str, bandwidth: float) -> dict:
    from fullgraph.entrypoints.llm import LLM
    args = engine_args_from(ns)
    bmax = max(ns.batch_sizes)
    per_req = -(-(ns.input_len + ns.output_len) // args.block_size)
    args = dataclasses.replace(
        args, enforce_eager=mode == "eager", max_num_seqs=max(args.max_num_seqs, bmax),
        max_model_len=args.max_model_len or ns.input_len + ns.output_len + args.block_size,
        num_gpu_blocks_override=args.num_gpu_blocks_override or bmax * per_req + 64)
    t0 = time.perf_counter()
    llm = LLM(**dataclasses.asdict(args))
    startup = time.perf_counter() - t0
    engine = llm.engine
    runner = engine.runner
    if mode == "graph" and engine.config.compilation.cudagraph_mode == CUDAGraphMode.NONE:
        mode = f"eager (no CUDA graphs on {engine.config.device})"
        print(f"[graph] {engine.config.device} has no CUDA graphs: this mode runs eagerly")
    w_bytes = weight_bytes(runner.model)
    kv_per_token = runner.kv_bytes_per_block // runner.block_size
    # linear-attention layers read and write each request's state once a step
    state = runner.cache_specs.state
    state_per_req = 2 * state.bytes_per_slot(engine.config.model.dtype) if state else 0
    # the row lines name the kernel mode too (--compare-batch-invariant runs both)
    label = mode + (" (batch-invariant)" if engine.config.kernel_policy.batch_invariant else "")
    rng = np.random.default_rng(0)
    rows = []
    for b in ns.batch_sizes:
        # warm up on the same workload: compiles (eager mode) and captures the lazy graph
        # sizes its steps take (a prompt phase's last step depends on the output length)
        bench_batch(engine, b, ns.input_len, ns.output_len, rng)
        row = bench_batch(engine, b, ns.input_len, ns.output_len, rng)
        ctx = ns.input_len + ns.output_len / 2
        step_bytes = w_bytes + b * (ctx * kv_per_token + state_per_req)
        row["bytes_per_step"] = step_bytes
        row["floor_ms"] = step_bytes / bandwidth * 1e3
        row["achieved_GBps"] = step_bytes / (row["decode_ms_median"] / 1e3) / 1e9
        row["ratio_to_floor"] = row["decode_ms_median"] / row["floor_ms"]
        rows.append(row)
        kernels = row["kernels_per_decode_step"]
        accepted = row["mean_accepted_len"]
        print(f"[{label}] batch {b:4d}: {row['decode_ms_median']:.3f} ms/step "
              f"({row['ratio_to_floor']:.2f}x floor, {row['achieved_GBps']:.0f} GB/s), "
              f"TTFT {row['ttft_ms']:.1f} ms"
              + (f", {kernels} kernels" if kernels is not None else "")
              + (f", {row['output_tok_per_s']:.0f} tok/s" if row["output_tok_per_s"] else "")
              + (f", mean accepted length {accepted:.2f}" if accepted else ""), flush=True)
    report = runner.capture_report
    result = {"mode": label, "startup_s": startup, "weight_bytes": w_bytes, "rows": rows,
              "capture_seconds": report.seconds if report else None,
              "capture_warmup_seconds": report.warmup_seconds if report else None,
              "num_graphs": report.num_graphs if report else 0,
              "graph_memory_GiB": report.memory_bytes / 2**30 if report else None,
              "eager_fallbacks": runner.dispatcher.num_eager_fallbacks}
    del llm, engine, runner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main(ns: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if (device.type == "cpu" or ns.device == "cpu") and set(ns.modes) == {"graph", "eager"}:
        print("[graph] no CUDA graphs on the CPU: only the eager mode runs (a quick CPU run: "
              "--model tiny-qwen3 --batch-sizes 1 8 --input-len 64 --output-len 32)")
        ns.modes = ["eager"]
    bandwidth = copy_bandwidth(device)
    if ns.compare_batch_invariant and ns.speculative_config:
        raise ValueError("--compare-batch-invariant and --speculative-config: choose one "
                         "comparison a run")
    if ns.compare_batch_invariant:
        return compare_batch_invariant(ns, device, bandwidth)
    modes = [run_mode(ns, m, bandwidth) for m in ns.modes]
    if ns.speculative_config:                 # the same batches without speculation
        plain = argparse.Namespace(**{**vars(ns), "speculative_config": None})
        for m in list(modes):
            base = run_mode(plain, "graph" if m["mode"].startswith("graph") else "eager",
                            bandwidth)
            base["mode"] += " (no speculation)"
            for row, ref in zip(m["rows"], base["rows"]):
                if not (row["output_tok_per_s"] and ref["output_tok_per_s"]):
                    continue                         # no decode step was timed
                row["speedup_tok_per_s"] = row["output_tok_per_s"] / ref["output_tok_per_s"]
                print(f"[{m['mode']}] batch {row['batch']:4d}: "
                      f"{row['speedup_tok_per_s']:.2f}x the tokens/s without speculation")
            modes.append(base)
    return report(ns, device, bandwidth, modes)


def compare_batch_invariant(ns: argparse.Namespace, device: torch.device,
                            bandwidth: float) -> int:
    """Each mode in the normal mode, then in the batch-invariant mode: the mode's cost."""
    modes = []
    for m in ns.modes:
        normal, invariant = (run_mode(argparse.Namespace(**{**vars(ns), "batch_invariant": on}),
                                      m, bandwidth) for on in (False, True))
        for row, ref in zip(invariant["rows"], normal["rows"]):
            row["over_normal_ms_per_step"] = row["decode_ms_median"] / ref["decode_ms_median"]
            row["over_normal_ttft"] = row["ttft_ms"] / ref["ttft_ms"]
            print(f"[{invariant['mode']}] batch {row['batch']:4d}: "
                  f"{row['over_normal_ms_per_step']:.2f}x the normal mode's ms/step, "
                  f"{row['over_normal_ttft']:.2f}x its TTFT", flush=True)
        modes += [normal, invariant]
    return report(ns, device, bandwidth, modes)


def report(ns: argparse.Namespace, device: torch.device, bandwidth: float,
           modes: list[dict]) -> int:
    data = header(device) | {"copy_bandwidth_GBps": bandwidth / 1e9, "model": ns.model,
                             "input_len": ns.input_len, "output_len": ns.output_len,
                             "speculative_config": ns.speculative_config, "modes": modes}
    path = write_json(ns.out, "bench_latency.json", data)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in data["modes"]:
        bs = [r["batch"] for r in m["rows"]]
        ax.plot(bs, [r["decode_ms_median"] for r in m["rows"]], marker="o", label=m["mode"])
    ax.plot(bs, [r["floor_ms"] for r in data["modes"][0]["rows"]], "k--", label="bandwidth floor")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="decode ms/step",
           title=f"{ns.model} on {data['device']}")
    ax.legend()
    fig.savefig(os.path.splitext(path)[0] + ".png", dpi=120, bbox_inches="tight")
    print(f"wrote {path}")
    return 0
