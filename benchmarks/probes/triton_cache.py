"""Probe: does a fresh process find our Triton kernels in the on-disk cache?

    python benchmarks/probes/triton_cache.py   (run it twice; the second run should be fast)
"""
import os
import time

import torch

from fullgraph.layers.gemv import gemv


def main() -> None:
    import triton
    x = torch.randn(3, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    gemv(x, w)
    torch.cuda.synchronize()
    print(f"triton {triton.__version__}: first gemv {time.perf_counter() - t0:.2f} s; "
          f"TRITON_CACHE_DIR={os.environ.get('TRITON_CACHE_DIR')} "
          f"knobs.cache.dir={getattr(getattr(triton, 'knobs', None), 'cache', None) and triton.knobs.cache.dir}")


if __name__ == "__main__":
    main()
