"""Probe: host microseconds per call of a step's input and output transfers, kernel
(pcie_copy.py) against copy engine, at a batch-32 decode step's extents.

    python benchmarks/probes/host_copy_launch.py [--reqs 32] [--calls 2000]
"""
from __future__ import annotations

import argparse
import time

import torch

from fullgraph import pcie_copy
from fullgraph.worker.inputs import InputBuffers
from fullgraph.worker.step_output import to_host


def per_call_us(fn, calls: int) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reqs", type=int, default=32)
    p.add_argument("--calls", type=int, default=2000)
    a = p.parse_args()
    dev = torch.device("cuda")
    buffers = InputBuffers(256, 8192, 64, 32, 151936, dev)
    arena, n = buffers.arena, a.reqs
    sampled = buffers.sampled[:n]
    host = torch.empty(n, dtype=torch.int64, pin_memory=True)
    rows = {
        "inputs, kernel (step extents)": lambda: arena.copy_to_gpu(n, n),
        "inputs, copy engine (whole arena)": lambda: arena.gpu.copy_(arena.cpu, non_blocking=True),
        "samples, kernel": lambda: to_host(sampled),
        "samples, kernel into a reused buffer": lambda: to_host(sampled, host),
        "samples, copy engine": lambda: host.copy_(sampled, non_blocking=True),
        "samples, copy engine into a new pinned tensor":
            lambda: torch.empty(n, dtype=torch.int64, pin_memory=True).copy_(sampled,
                                                                            non_blocking=True),
    }
    print(f"pcie_copy supported: {pcie_copy.supported(dev)}, arena {arena.nbytes} bytes")
    for name, fn in rows.items():
        print(f"  {name:48s} {per_call_us(fn, a.calls):7.2f} us/call")


if __name__ == "__main__":
    main()
