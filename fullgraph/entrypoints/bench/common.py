"""Shared pieces of the offline benchmarks: device facts, output files, plots, prompts."""
from __future__ import annotations

import json
import os
import platform
import time
from datetime import datetime, timezone

import numpy as np
import torch


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    if device.type != "cuda":
        nbytes, iters = 1 << 26, 5
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * nbytes * iters / (time.perf_counter() - t0)


def header(device: torch.device) -> dict:
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device_description(device), "torch": torch.__version__}


def write_json(out_dir: str, name: str, data: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    return path


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def random_prompt(engine, rng: np.random.Generator, n: int, high: int | None = None
                  ) -> list[int]:
    """`n` random token ids below `high` (default: the vocabulary) for a text prompt: a draw
    of an image placeholder (a prompt with image tokens needs images) becomes id 0, so a
    text model's prompt is what `rng.integers` alone gives."""
    ids = rng.integers(0, high or engine.config.model.vocab_size, n)
    if engine.mm_processor is not None:
        ids[np.isin(ids, engine.mm_processor.placeholder_ids)] = 0
    return ids.tolist()
