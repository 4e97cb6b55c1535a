"""`fullgraph bench encoder`: the vision encoder over a stream of mixed image sizes, eager vs
CUDA graphs per patch budget (worker/encoder_graphs.py), and the time to first token of a
one-image chat request.

A seeded stream of `--num-images` random images, sides uniform in [`--min-side`,
`--max-side`] pixels, is preprocessed up front; each image is then encoded alone, as a
request arriving by itself would be, once through the model's eager `encode_images` and
once through the engine's encoder graphs. Per mode: latency mean, p50 and p99 (ms, the
call until its outputs are ready), and for the graphs the capture time, graph memory and the
images that ran eagerly because no budget held them.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch

from fullgraph.engine.args import resolve_device
from fullgraph.entrypoints.bench.common import header, write_json
from fullgraph.entrypoints.cli_args import add_engine_args, engine_args_from
from fullgraph.sampling_params import SamplingParams


def add_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.set_defaults(model="qwen3-vl-2b-random")
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--min-side", type=int, default=224, help="pixels")
    p.add_argument("--max-side", type=int, default=1024, help="pixels")
    p.add_argument("--workload-seed", type=int, default=0)
    p.add_argument("--out", default="bench_out")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _latencies(encode, images, device) -> list[float]:
    out = []
    for pixels, grid in images:
        _sync(device)
        t0 = time.perf_counter()
        encode(pixels, grid)
        _sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _summary(ms: list[float]) -> dict:
    s = sorted(ms)
    return {"mean_ms": statistics.fmean(s), "p50_ms": s[len(s) // 2],
            "p99_ms": s[min(len(s) - 1, int(0.99 * len(s)))]}


def main(ns: argparse.Namespace) -> int:
    from fullgraph.entrypoints.llm import LLM
    args = engine_args_from(ns)
    device = resolve_device(args.device)              # before the model loads
    if device.type != "cuda":
        raise SystemExit("bench encoder times the encoder's CUDA graphs against eager "
                         f"runs: it needs a CUDA device (this run's: {device})")
    llm = LLM(**dataclasses.asdict(args))
    engine, runner = llm.engine, llm.engine.runner
    if engine.mm_processor is None:
        raise SystemExit(f"{ns.model} takes no images")
    if runner.encoder_graphs is None:
        raise SystemExit("no encoder graphs: run with CUDA graphs on (not --enforce-eager or "
                         "--cudagraph-mode none)")
    device, dtype = runner.device, engine.config.model.dtype
    rng = np.random.default_rng(ns.workload_seed)
    proc = engine.mm_processor.image_processor
    images = []
    for _ in range(ns.num_images):
        h, w = rng.integers(ns.min_side, ns.max_side + 1, 2)
        p = proc([rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8)])
        images.append((p.pixel_values, [tuple(int(v) for v in p.image_grid_thw[0])]))
    model, graphs = runner.model, runner.encoder_graphs

    def eager(pixels, grid):
        return model.encode_images(pixels.to(device, dtype), grid)

    with torch.inference_mode():
        for pixels, grid in images[:3]:              # warm both paths (kernels compile)
            eager(pixels, grid)
            graphs.encode(pixels, grid)
        eager_ms = _latencies(eager, images, device)
        replays0, eager0 = graphs.num_graph_replays, graphs.num_eager_fallbacks
        graph_ms = _latencies(graphs.encode, images, device)
    report = graphs.capture_report
    chat = [{"role": "user", "content": [
        {"type": "image", "image": rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)},
        {"type": "text", "text": "Describe the image."}]}]
    one = SamplingParams(temperature=0.0, max_tokens=1)
    llm.chat(chat, one, use_tqdm=False)                    # warm
    t0 = time.perf_counter()
    llm.chat(chat, one, use_tqdm=False)
    ttft_ms = (time.perf_counter() - t0) * 1e3
    data = header(device) | {
        "model": ns.model, "num_images": ns.num_images,
        "sides": [ns.min_side, ns.max_side], "budgets": list(graphs.budgets),
        "eager": _summary(eager_ms), "graph": _summary(graph_ms),
        "graph_replays": graphs.num_graph_replays - replays0,
        "images_run_eagerly": graphs.num_eager_fallbacks - eager0,
        "capture_seconds": report.seconds if report else None,
        "graph_memory_GiB": report.memory_bytes / 2 ** 30 if report else None,
        "ttft_one_image_chat_ms": ttft_ms}
    for mode in ("eager", "graph"):
        s = data[mode]
        print(f"[{mode:5s}] mean {s['mean_ms']:.2f} ms, p50 {s['p50_ms']:.2f}, "
              f"p99 {s['p99_ms']:.2f}")
    e, g = data["eager"], data["graph"]
    print(f"graphs vs eager: mean {g['mean_ms'] / e['mean_ms'] - 1:+.1%}, "
          f"p99 {g['p99_ms'] / e['p99_ms'] - 1:+.1%}; {data['images_run_eagerly']} of "
          f"{ns.num_images} images above the budgets {list(graphs.budgets)}")
    print(f"TTFT, one-image chat request: {ttft_ms:.1f} ms")
    print(f"wrote {write_json(ns.out, 'bench_encoder.json', data)}")
    return 0
