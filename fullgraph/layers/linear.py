"""Linear layers: skinny inputs (decode) go to our Triton kernel, the rest to cuBLAS; merged
layers hold several checkpoint tensors (q/k/v, gate/up) in one weight. In the
batch-invariant mode (layers/policy.py) every row goes through one fixed-shape call."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fullgraph.layers import invariant_gemm
from fullgraph.layers.gemv import gemv, gemv_supported, matmul
from fullgraph.layers.opaque import opaque_op
from fullgraph.layers.policy import DEFAULT_POLICY, KernelPolicy, policy_of


# An opaque op for torch.compile: the row count is only known at run time (compiled layers
# are dynamic in it), and it picks the kernel then.
@opaque_op("fullgraph::linear")
def _linear(x: torch.Tensor, weight: torch.Tensor,
            l2_prefetch_next: list[torch.Tensor]) -> torch.Tensor:
    return matmul(x, weight, l2_prefetch_next)


@_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, l2_prefetch_next: list[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def invariant_matmul(x: torch.Tensor, weight: torch.Tensor, policy: KernelPolicy,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T where a row's bits do not depend on M. On the GPU, a
    Triton kernel that accumulates in K order with no split-K (layers/invariant_gemm.py). On
    the CPU, every row is computed by an `F.linear` call of one shape, [matmul_block_rows, K],
    the last block zero-padded.

    On the CPU, MKL (float32) and oneDNN (bfloat16) pick their algorithm from the row count,
    so a row's bits change with M (docs/batch_invariance.md, section 3). Through calls of one
    shape they depend on the row and the weight only (measured: not on the row's place in the
    block). Each block is a fresh allocation: a view into a larger tensor would vary its
    alignment with the offset, which the library may also key on."""
    if x.is_cuda:
        return invariant_gemm.invariant_mm(x, weight, out)
    m, k = x.shape
    if out is None:
        out = x.new_empty(m, weight.shape[0])
    for start, n in policy.matmul_calls(m):
        block = x.new_zeros(policy.matmul_block_rows, k)
        block[:n] = x[start:start + n]
        out[start:start + n] = F.linear(block, weight)[:n]
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           l2_prefetch_next: tuple[torch.Tensor, ...] = (),
           policy: KernelPolicy = DEFAULT_POLICY) -> torch.Tensor:
    """`l2_prefetch_next`: weights the next kernels read, a hint (layers/l2_prefetch.py)."""
    if policy.batch_invariant:
        y = invariant_matmul(x.reshape(-1, x.shape[-1]), weight, policy)
        y = y.view(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    if not x.is_cuda or x.dim() != 2:
        return F.linear(x, weight, bias)
    y = _linear(x, weight, list(l2_prefetch_next))
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint names) through `linear`."""

    def forward(self, x: torch.Tensor,
                l2_prefetch_next: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        return linear(x, self.weight, self.bias, l2_prefetch_next, policy_of(self))


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
        return linear(x, self.weight, self.bias, policy=policy_of(self))


def logits_into(hidden: torch.Tensor, lm_head_weight: torch.Tensor, out: torch.Tensor,
                policy: KernelPolicy = DEFAULT_POLICY) -> torch.Tensor:
    """The LM head into `out` (the runner's persistent [rows, vocab] buffer): our skinny
    GEMV for the few rows of a decode step, cuBLAS otherwise. In the batch-invariant mode
    generation (a few rows) and prompt scoring (hundreds) produce the same row bits."""
    if policy.batch_invariant:
        return invariant_matmul(hidden, lm_head_weight, policy, out)
    if gemv_supported(hidden, lm_head_weight):
        return gemv(hidden, lm_head_weight, out)
    return torch.matmul(hidden, lm_head_weight.t(), out=out)
