"""The kernel policy: which kernels an engine may choose, decided once per engine.

Several ops pick their kernel from the step's row count (a skinny GEMV or a GEMM, a fused
prologue or not, blocked or not). That is the fastest choice per shape, but it makes a row's
bits depend on what else is in the step. The batch-invariant mode (`--batch-invariant`,
`FULLGRAPH_BATCH_INVARIANT=1`, `LLM(batch_invariant=True)`; docs/batch_invariance.md) pins
every such choice to one whose per-row arithmetic depends on the row alone.

The policy is engine configuration: frozen, made in `EngineArgs.create_engine_config`,
stamped on every module of the model at load (`apply_kernel_policy`) and handed to the
attention backend at construction. No module global: two engines, one in each mode, can
share a process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn

ENV_FLAG = "FULLGRAPH_BATCH_INVARIANT"


@dataclass(frozen=True, slots=True)
class KernelPolicy:
    """`batch_invariant=False` is the normal mode: kernels are picked from the row count.
    The other fields are the mode's pinned shapes; they are part of the numerics (two
    engines agree bit for bit only with equal values), so they are constants, never derived
    from the batch."""
    batch_invariant: bool = False
    # rows of every invariant matmul call (a GPU kernel's BLOCK_M)
    matmul_block_rows: int = 64
    # KV tokens per online-softmax step, and per split (a multiple of the tile): a token's
    # attention is the split partials of its logical KV, merged in split order
    attention_tile: int = 32
    attention_split: int = 256
    # the gated delta rule's chunk; in the mode the state is committed at multiples of it
    gdn_chunk: int = 64

    def __post_init__(self) -> None:
        for name in ("matmul_block_rows", "attention_tile", "attention_split", "gdn_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"KernelPolicy.{name} must be positive, "
                                 f"got {getattr(self, name)}")
        if self.attention_split % self.attention_tile:
            raise ValueError(f"KernelPolicy.attention_split ({self.attention_split}) must be "
                             f"a multiple of attention_tile ({self.attention_tile})")

    @classmethod
    def from_args(cls, batch_invariant: bool | None = None,
                  environ: dict[str, str] | None = None, **shapes: int) -> KernelPolicy:
        """`batch_invariant` (the LLM argument, --batch-invariant / --no-batch-invariant)
        wins; None reads FULLGRAPH_BATCH_INVARIANT, once, here ("1"/"true" on,
        "0"/"false"/unset off, anything else a ValueError)."""
        if batch_invariant is None:
            raw = (os.environ if environ is None else environ).get(ENV_FLAG, "0")
            raw = raw.strip().lower()
            if raw not in ("0", "1", "true", "false", ""):
                raise ValueError(f"{ENV_FLAG} must be 0 or 1, got {raw!r}")
            batch_invariant = raw in ("1", "true")
        return cls(batch_invariant=batch_invariant, **shapes)

    def require(self, component: str, supported: bool) -> None:
        """ValueError when the mode is on and `component` cannot keep it: asked-for
        invariance is never dropped silently."""
        if self.batch_invariant and not supported:
            raise ValueError(f"{component} does not support batch-invariant mode "
                             f"(--batch-invariant / {ENV_FLAG}=1)")

    def matmul_calls(self, rows: int) -> list[tuple[int, int]]:
        """(first row, rows) of each matmul call for `rows` rows: one call normally; in the
        mode, blocks of `matmul_block_rows` (the last one zero-padded)."""
        if not self.batch_invariant:
            return [(0, rows)] if rows else []
        b = self.matmul_block_rows
        return [(i, min(b, rows - i)) for i in range(0, rows, b)]


DEFAULT_POLICY = KernelPolicy()


def apply_kernel_policy(model: nn.Module, policy: KernelPolicy) -> nn.Module:
    """Stamp `policy` on the model and every submodule (`kernel_policy`), once, at load:
    forwards hand it to the ops they call."""
    for module in model.modules():
        module.kernel_policy = policy
    return model


def policy_of(module: Any) -> KernelPolicy:
    return getattr(module, "kernel_policy", DEFAULT_POLICY)
