"""Probe: what a kernel boundary and a dependent memory round trip cost inside a CUDA graph,
with and without PDL. A batch-1 decode step is ~175 small kernels whose time is mostly
latency (docs/benchmarks.md), so these two numbers bound what reordering work can win.

    python benchmarks/probes/kernel_chain.py --grids 1 132 1056 --trips 1 2 4

One graph replays a chain of 50 kernels; kernel i reads the buffer kernel i - 1 wrote (a
true dependency) through `trips` dependent loads (each load's address comes from the value
before; it is the same line, so the later loads hit L1: trips show little) and stores it.
`--atomic` adds the decode kernel's ending: a block barrier, an atomic arrival count
(`--sem`: acq_rel as there; release, or relaxed, which orders nothing, to split the cost),
and the last program to arrive resetting the counter (`--reset-sem`: an acq_rel or relaxed
exchange, or a plain store as the decode kernel now does: the kernel boundary orders it for
the next launch). Prints µs per kernel.
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton
import triton.language as tl

from gemv import timed

BLOCK = 128                    # one element per thread at 4 warps


@triton.jit
def _link(src_ptr, dst_ptr, counter_ptr, TRIPS: tl.constexpr, ATOMIC: tl.constexpr,
          SEM: tl.constexpr, RESET_SEM: tl.constexpr, USE_PDL: tl.constexpr,
          BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x = tl.load(src_ptr + offs)
    for _ in tl.static_range(TRIPS - 1):
        # every element holds its own index, so this reloads the same address, but only
        # after the previous load returned
        x = tl.load(src_ptr + x)
    tl.store(dst_ptr + offs, x)
    if ATOMIC:
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr, 1, sem=SEM)
        if arrived == tl.num_programs(0) - 1:
            if RESET_SEM == "store":
                tl.store(counter_ptr, 0)
            else:
                tl.atomic_xchg(counter_ptr, 0, sem=RESET_SEM)


def per_kernel_us(grid: int, trips: int, atomic: bool, pdl: bool, chain: int,
                  sem: str = "acq_rel", reset_sem: str = "acq_rel") -> float:
    n = grid * BLOCK
    bufs = [torch.arange(n, dtype=torch.int32, device="cuda") for _ in range(2)]
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    links = list(range(chain))

    def link(i: int) -> None:
        _link[(grid,)](bufs[i % 2], bufs[(i + 1) % 2], counter, TRIPS=trips, ATOMIC=atomic,
                       SEM=sem, RESET_SEM=reset_sem, USE_PDL=pdl, BLOCK=BLOCK, num_warps=4,
                       launch_pdl=pdl)

    us = timed(link, links)
    if not torch.equal(bufs[0], torch.arange(n, dtype=torch.int32, device="cuda")):
        raise RuntimeError("the chain changed its buffers")   # the chase must stay in place
    return us


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--grids", type=int, nargs="+", default=[1, 132, 1056])
    p.add_argument("--trips", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--chain", type=int, default=50)
    p.add_argument("--atomic", action="store_true")
    p.add_argument("--sem", nargs="+", default=["acq_rel"],
                   choices=["acq_rel", "release", "acquire", "relaxed"])
    p.add_argument("--reset-sem", nargs="+", default=["acq_rel"],
                   choices=["acq_rel", "relaxed", "store"])
    p.add_argument("--json")
    a = p.parse_args()
    rows = []
    for grid in a.grids:
        for trips in a.trips:
            for sem, reset in itertools.product(*((a.sem, a.reset_sem) if a.atomic
                                                  else (["-"], ["-"]))):
                for pdl in (False, True):
                    us = per_kernel_us(grid, trips, a.atomic, pdl, a.chain, sem, reset)
                    rows.append(dict(grid=grid, trips=trips, atomic=a.atomic, sem=sem,
                                     reset_sem=reset, pdl=pdl, us_per_kernel=round(us, 3)))
                    print(f"grid {grid:5d}  trips {trips}  atomic {int(a.atomic)} {sem:8s} "
                          f"reset {reset:8s} pdl {int(pdl)}: {us:6.2f} us/kernel", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
