"""Probe: host time of InputBuffers.prepare for B decoding requests (min over rounds).

    python benchmarks/probes/prepare.py 32 cuda
"""
import time, torch, numpy as np, sys
from dataclasses import dataclass
from fullgraph.worker.inputs import InputBuffers
from fullgraph.worker.cudagraph.descriptor import BatchExecutionDescriptor
from fullgraph.config import CUDAGraphMode
from fullgraph.sampling_params import SamplingParams
@dataclass
class R:
    all_token_ids: list; num_computed_tokens: int; block_ids: list; sampling_params: SamplingParams; seed: int
@dataclass
class C:
    request: R; num_new_tokens: int; samples: bool = True; spec_token_ids: tuple = ()
B = int(sys.argv[1])
buf = InputBuffers(256, 8192, 64, 16, 151936, torch.device(sys.argv[2] if len(sys.argv) > 2 else "cpu"))
rng = np.random.default_rng(0)
reqs = [R(rng.integers(0, 1000, 600).tolist(), 599, list(range(1 + 40*i, 1 + 40*i + 38)), SamplingParams(temperature=0.0), i) for i in range(B)]
chunks = [C(r, 1) for r in reqs]
desc = BatchExecutionDescriptor(CUDAGraphMode.FULL, B, B, 1)
for _ in range(50): buf.prepare(chunks, desc)
N = 500
best = 1e9
for _ in range(8):
    t = time.perf_counter()
    for i in range(N):
        buf.prepare(chunks, desc)
    best = min(best, (time.perf_counter()-t)/N*1e6)
print(f"B={B} prepare {best:.1f} us")
import cProfile, pstats
pr = cProfile.Profile(); pr.enable()
for i in range(N):
    buf.prepare(chunks, desc)
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(12)
