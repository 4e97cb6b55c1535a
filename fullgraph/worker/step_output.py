"""What a launched step gives back: its samples, on their way to host memory."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fullgraph import pcie_copy


@dataclass(slots=True)
class StepResult:
    token_ids: np.ndarray                    # [num_reqs] sampled token per scheduled request
    logprobs: np.ndarray | None = None       # [num_reqs, 1 + N]
    logprob_token_ids: np.ndarray | None = None
    ranks: np.ndarray | None = None
    # row -> (logprobs [P, 1+N], token ids [P, 1+N], ranks [P]) of the prompt positions the
    # step computed (worker/prompt_logprobs.py)
    prompt_logprobs: dict[int, tuple[np.ndarray, ...]] | None = None
    # Speculative steps: token_ids is [num_reqs, k + 1] (accepted drafts, then the target's
    # token; the sample fields gain the same axis), num_emitted [num_reqs] how many of a
    # row's are its tokens, and draft_token_ids each row's drafts for its next step.
    num_emitted: np.ndarray | None = None
    draft_token_ids: list[list[int]] | None = None
    # a speculative step that continued the one before it (async scheduling): each row's
    # real drafts, which the device decided (the host scheduled an upper bound)
    num_drafts: np.ndarray | None = None


@dataclass(slots=True)
class PendingStep:
    """A launched step: its outputs are on their way to host memory."""
    tensors: tuple[torch.Tensor | None, ...]      # StepResult's sample fields, host tensors
    event: torch.cuda.Event | None
    prompt_logprobs: dict[int, tuple[np.ndarray, ...]] | None = None     # already on host
    ready: StepResult | None = None      # a step whose results are on the host already
    # how the host arrays become the result, where they are not StepResult's sample fields
    build: Callable[[tuple[np.ndarray | None, ...]], StepResult] | None = None
    # a speculative step whose verification and drafts stay on the device, where the next
    # step can read them before this one's results reach the host (async scheduling)
    continuable: bool = False

    def wait(self) -> StepResult:
        """The results, copied out of the host tensors (which a later step may reuse)."""
        if self.ready is not None:
            return self.ready
        if self.event is not None:
            self.event.synchronize()
        arrays = tuple(t.numpy().copy() if t is not None else None for t in self.tensors)
        if self.build is not None:
            return self.build(arrays)
        return StepResult(*arrays, prompt_logprobs=self.prompt_logprobs)


def to_host(t: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """`t` on its way into pinned host memory: `out` (a slice of a reused buffer) or a new
    tensor."""
    if t is None:
        return None
    if t.device.type == "cpu":
        return t.clone()          # the persistent source is rewritten by the next step
    if pcie_copy.supported(t.device) and t.is_contiguous():
        return pcie_copy.to_host(t, out)
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True) if out is None else out
    return host.copy_(t, non_blocking=True)
