"""Programmatic dependent launch (PDL, Hopper and later) for our Triton kernels.

Inside a CUDA graph each kernel still waits for the one before it to drain before its own
programs start: ~1.5-2 µs per boundary, and a batch-1 step has ~240 boundaries. Launched with
PDL, a kernel's programs may start while the previous kernel finishes; each of our kernels
first loads what no earlier kernel writes (a GEMV's weights), then `gdc_wait`s for the
previous kernel's memory, then lets the next kernel launch (`gdc_launch_dependents`). Every
PDL kernel waits before its first dependent load and before any store, so ordering stays
transitive across kernels that do not use PDL (cuBLAS, inductor's). A kernel may load before
its wait what a kernel two or more launches back wrote (the step's inputs in the q/k
kernels): its predecessor lets it launch only after the predecessor's own wait, which
returned once everything before the predecessor had completed. One exception: the q/k
kernel at 2-64 tokens lets decode attention launch before its own wait
(layers/qk_norm_rope.py, measured faster there); attention loads nothing before its wait.
CUDA graph capture keeps these as programmatic edges.

Inductor can emit the same for the kernels it generates (`triton.enable_pdl`, torch >= 2.11):
`inductor_options` turns it on for our compiled layers and FlexAttention. Measured on an H100
(docs/benchmarks.md): batch-1 decode 1.137 -> 1.001 ms with our kernels alone, 0.941 ms with
inductor's as well.

On by default where the GPU supports it; `FULLGRAPH_PDL=0` turns it off (A/B benchmarks,
or a driver that mishandles it). Read once per process: a launch option, not step state.

After graph capture, replays run ~3-4% slower (H100, Triton 3.6) until a PDL kernel is
launched outside a graph; `launch_outside_graph` is that launch, and the runner makes it after
capturing. Which launches restore the fast state was bisected on the device
(docs/benchmarks.md, ninth session): a PDL Triton kernel does; the same kernel without PDL, a
torch elementwise kernel or a cuBLAS GEMM do not. The cause is inside the driver. An eager
PDL kernel just before each replay changes the replay's speed too, faster or slower by batch
size (eleventh session; the runner's `_graph_copies_inputs` follows it), so this launch keeps
the fix independent of how inputs travel.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _mark_kernel(out_ptr):
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
        tl.store(out_ptr, 1)
except ImportError:            # CPU-only installs: there is no PDL to restore
    triton = None


@functools.cache
def _enabled(device_index: int) -> bool:
    if os.environ.get("FULLGRAPH_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _device_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and _enabled(device.index if device.index is not None
                                              else torch.cuda.current_device())


def pdl_enabled(t: torch.Tensor) -> bool:
    """Whether kernels on `t`'s device launch with PDL (asked once or more per launch of an
    eager step: without building `t.device`)."""
    return t.is_cuda and _enabled(t.get_device())


def inductor_options(device: torch.device) -> dict[str, bool]:
    """torch.compile options that make inductor's kernels PDL kernels too, where enabled."""
    import torch._inductor.config as inductor_config
    if not hasattr(inductor_config.triton, "enable_pdl") or not _device_enabled(device):
        return {}
    return {"triton.enable_pdl": True}


def launch_outside_graph(device: torch.device) -> torch.Tensor | None:
    """Launch one tiny PDL kernel eagerly on the current stream (why: the module docstring).
    Returns the int32 it sets to 1, or None where PDL is off."""
    if triton is None or not _device_enabled(device):
        return None
    mark = torch.zeros(1, dtype=torch.int32, device=device)
    _mark_kernel[(1,)](mark, launch_pdl=True)
    return mark
