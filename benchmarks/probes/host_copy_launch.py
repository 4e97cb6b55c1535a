"""Probe: host microseconds per call of a step's input and output transfers, kernel
(pcie_copy.py) against copy engine, at a batch-32 decode step's extents.

    python benchmarks/probes/host_copy_launch.py [--reqs 32] [--calls 2000]
    python benchmarks/probes/host_copy_launch.py --behind idle sleep graph graph_pdl

`--behind` times each call alone (wall and the thread's CPU time, median and p90) with the
stream idle or behind queued work, as in the engine, where a step's copies launch while the
previous step's graph runs: a 1 ms sleep kernel, or a graph of 300 small kernels (torch's,
or PDL Triton kernels like the decode graph's).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from graph_timing import per_call_us   # this folder, sys.path[0] when run

from fullgraph import pcie_copy
from fullgraph.layers import pdl
from fullgraph.worker.inputs import InputBuffers
from fullgraph.worker.step_output import to_host


def behind_us(fn, calls: int, before) -> tuple[list[float], list[float]]:
    wall, cpu = [], []
    for _ in range(calls):
        before()
        t, c = time.perf_counter(), time.thread_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
        torch.cuda.synchronize()
    return wall, cpu


def queued_work(dev: torch.device) -> dict:
    """What the stream may be busy with when a copy launches."""
    y = torch.zeros(1 << 20, device=dev)
    flag = torch.zeros(1, dtype=torch.int32, device=dev)
    pdl._mark_kernel[(1,)](flag, launch_pdl=True)     # compiled before capture
    y.add_(1)
    torch.cuda.synchronize()
    graphs = {}
    for name in ("graph", "graph_pdl"):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(300):
                if name == "graph":
                    y.add_(1)
                else:
                    pdl._mark_kernel[(1,)](flag, launch_pdl=True)
        graphs[name] = g
    return {"idle": lambda: None, "sleep": lambda: torch.cuda._sleep(2_000_000),
            "graph": graphs["graph"].replay, "graph_pdl": graphs["graph_pdl"].replay}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reqs", type=int, default=32)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--behind", nargs="*", choices=["idle", "sleep", "graph", "graph_pdl"])
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
    print(f"pcie_copy supported: {pcie_copy.supported(dev)}, PDL {pdl.pdl_enabled(sampled)}, "
          f"arena {arena.nbytes} bytes")
    if not a.behind:
        for name, fn in rows.items():
            print(f"  {name:48s} {per_call_us(fn, a.calls):7.2f} us/call")
        return
    work = queued_work(dev)
    for cond in a.behind:
        print(f"behind {cond}: wall median/p90, cpu median/p90 (µs)")
        for name, fn in rows.items():
            behind_us(fn, 20, work[cond])            # warm up
            wall, cpu = behind_us(fn, min(a.calls, 500), work[cond])
            w, c = (np.percentile(1e6 * np.array(x), [50, 90]) for x in (wall, cpu))
            print(f"  {name:48s} {w[0]:7.2f} {w[1]:7.2f}   {c[0]:7.2f} {c[1]:7.2f}")


if __name__ == "__main__":
    main()
