"""Host time of one Triton launch, three ways, on the GPU machine (issue 27's eager path):
`kernel[grid](...)` (the JIT: binds and specializes every argument, looks the compiled
kernel up, checks globals, then launches), the compiled kernel's `[grid](...)` runner, and
its raw `run` with the launch metadata made once. Also a torch elementwise op and a no-op
`torch.library.custom_op`, for scale. The kernel is a small one with our ops' usual
arguments (4 tensors, 3 ints, 2 constexprs); the GPU work is tiny, so the loop's wall time
per call is the host's.

    python benchmarks/probes/triton_launch.py [--calls 5000]
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from graph_timing import per_call_us   # this folder, sys.path[0] when run
from triton import knobs


@triton.jit
def _scale_add(x_ptr, y_ptr, w_ptr, out_ptr, n, stride, eps, BLOCK: tl.constexpr,
               FLAG: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs * stride, mask=m, other=0.0)
    y = tl.load(y_ptr + offs, mask=m, other=0.0)
    w = tl.load(w_ptr + offs, mask=m, other=0.0)
    if FLAG:
        x = x + eps
    tl.store(out_ptr + offs, x * w + y, mask=m)


@torch.library.custom_op("probe::noop", mutates_args=())
def _noop(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, n: int, eps: float) -> None:
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=5000)
    args = ap.parse_args()
    n = 1024
    x, y, w, out = (torch.randn(n, device="cuda") for _ in range(4))
    grid = (triton.cdiv(n, 256),)
    ck = _scale_add[grid](x, y, w, out, n, 1, 1e-6, BLOCK=256, FLAG=True)
    runner = ck[(grid[0], 1, 1)]            # the compiled kernel's runner takes three axes
    dev = torch.cuda.current_device()
    stream = triton.runtime.driver.active.get_current_stream(dev)
    # the compiled kernel's arguments: the constexprs stay in the list (as the JIT passes
    # its bound arguments), their values already compiled in
    bound = (x, y, w, out, n, 1, 1e-6, 256, True)
    meta = ck.launch_metadata(grid, stream, *bound)

    def raw():
        ck.run(grid[0], 1, 1, stream, ck.function, ck.packed_metadata, meta,
               knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound)

    rows = [("triton JIT kernel[grid](...)",
             lambda: _scale_add[grid](x, y, w, out, n, 1, 1e-6, BLOCK=256, FLAG=True)),
            ("compiled kernel [grid] runner", lambda: runner(*bound)),
            ("compiled kernel raw run", raw),
            ("torch.add (ATen)", lambda: torch.add(x, y, out=out)),
            ("no-op custom op (dispatcher)", lambda: _noop(x, y, w, n, 1e-6))]
    print(torch.cuda.get_device_name(), "triton", triton.__version__, "torch", torch.__version__)
    with torch.inference_mode():
        for name, fn in rows:
            try:
                print(f"{name:<34} {per_call_us(fn, args.calls):7.2f} us/call", flush=True)
            except Exception as e:          # another Triton's compiled-kernel API
                print(f"{name:<34} failed: {type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    main()
