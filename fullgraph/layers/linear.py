"""Linear layers: skinny inputs (decode) go to our Triton kernel, the rest to cuBLAS; merged
layers hold several checkpoint tensors (q/k/v, gate/up) in one weight."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fullgraph.layers.gemv import gemv, gemv_supported, matmul


# An opaque op for torch.compile: the row count is only known at run time (compiled layers
# are dynamic in it), and it picks the kernel then.
@torch.library.custom_op("fullgraph::linear", mutates_args=())
def _linear(x: torch.Tensor, weight: torch.Tensor,
            l2_prefetch_next: list[torch.Tensor]) -> torch.Tensor:
    return matmul(x, weight, l2_prefetch_next)


@_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, l2_prefetch_next: list[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           l2_prefetch_next: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """`l2_prefetch_next`: weights the next kernels read, a hint (layers/l2_prefetch.py)."""
    if not x.is_cuda or x.dim() != 2:
        return F.linear(x, weight, bias)
    y = _linear(x, weight, list(l2_prefetch_next))
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint names) through `linear`."""

    def forward(self, x: torch.Tensor,
                l2_prefetch_next: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        return linear(x, self.weight, self.bias, l2_prefetch_next)


class MergedLinear(nn.Module):
    """One matmul for several projections of the same input, e.g. q/k/v or gate/up.

    `shard_names` are the checkpoint names of the parts, in output order; the loader calls
    `load_shard(name, tensor)` for each.
    """

    def __init__(self, in_features: int, out_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__()
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in out_sizes.items():
            self.offsets[name] = (start, size)
            start += size
        self.weight = nn.Parameter(torch.empty(start, in_features))
        self.bias = nn.Parameter(torch.empty(start)) if bias else None

    def load_shard(self, shard: str, param: str, tensor: torch.Tensor) -> None:
        start, size = self.offsets[shard]
        dst = self.weight if param == "weight" else self.bias
        if dst is None or tuple(tensor.shape) != tuple(dst[start:start + size].shape):
            got = tuple(tensor.shape)
            raise ValueError(f"checkpoint tensor {shard}.{param} has shape {got}, expected "
                             f"{tuple(dst[start:start + size].shape) if dst is not None else 'none'}")
        with torch.no_grad():
            dst[start:start + size].copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def logits_into(hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                out: torch.Tensor) -> torch.Tensor:
    """The LM head into `out` (the runner's persistent [rows, vocab] buffer): our skinny
    GEMV for the few rows of a decode step, cuBLAS otherwise."""
    if gemv_supported(hidden, lm_head_weight):
        return gemv(hidden, lm_head_weight, out)
    return torch.matmul(hidden, lm_head_weight.t(), out=out)
