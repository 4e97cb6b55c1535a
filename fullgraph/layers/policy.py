"""The kernel policy: which kernels an engine may choose, decided once per engine.

Several ops pick their kernel from the step's row count (a skinny GEMV or a GEMM, a fused
prologue or not, blocked or not). That is the fastest choice per shape, but it makes a row's
bits depend on what else is in the step. The batch-invariant mode (`--batch-invariant`,
`FULLGRAPH_BATCH_INVARIANT=1`, `LLM(batch_invariant=True)`; docs/batch_invariance.md) pins
every such choice to one whose per-row arithmetic depends on the row alone.

The policy (`config.KernelPolicy`) is engine configuration: frozen, made in
`EngineArgs.create_engine_config`, stamped on every module of the model at load
(`apply_kernel_policy`) and handed to the attention backend at construction. No module
global: two engines, one in each mode, can share a process.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from fullgraph.config import KernelPolicy   # noqa: F401 — the layers import it from here

DEFAULT_POLICY = KernelPolicy()


def apply_kernel_policy(model: nn.Module, policy: KernelPolicy) -> nn.Module:
    """Stamp `policy` on the model and every submodule (`kernel_policy`), once, at load:
    forwards hand it to the ops they call."""
    for module in model.modules():
        module.kernel_policy = policy
    return model


def policy_of(module: Any) -> KernelPolicy:
    return getattr(module, "kernel_policy", DEFAULT_POLICY)
