"""A CPU stand-in for CUDA graphs, with their replay semantics, for tests and CPU selftests.

Capture runs the function once under a dispatch mode that records every aten op with the
tensors it read and wrote. Replay re-executes exactly that op list on the same tensors,
copying each result into the tensor the op produced at capture: Python control flow,
host-side state and newly created objects are *not* re-run, just as with a real graph. An op
that would synchronize with the host (`.item()`, `.cpu()`, `nonzero`) fails the capture,
since a real graph cannot contain it either.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fullgraph.worker.cudagraph.manager import EagerPiece, PiecewiseGraph, replay_pieces

_HOST_SYNC_OPS = {"_local_scalar_dense", "nonzero", "item", "equal", "is_nonzero"}


class _Recorder(TorchDispatchMode):
    supports_higher_order_operators = True   # FlexAttention is recorded as one op

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "_opname", getattr(func, "__name__", ""))
        if name in _HOST_SYNC_OPS:
            raise RuntimeError(f"host synchronization ({name}) inside a captured graph")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class FakeGraph:
    def __init__(self, ops) -> None:
        self.ops = ops

    def replay(self) -> None:
        for func, args, kwargs, recorded in self.ops:
            fresh = func(*args, **kwargs)
            flat_new, _ = tree_flatten(fresh)
            flat_old, _ = tree_flatten(recorded)
            for new, old in zip(flat_new, flat_old):
                if isinstance(old, torch.Tensor) and new is not old and \
                        new.data_ptr() != old.data_ptr():
                    old.copy_(new)


class FakeGraphRuntime:
    def __init__(self) -> None:
        self.num_captures = 0
        self._pieces: list | None = None      # of the capture in progress
        self._recorder: _Recorder | None = None

    def capture(self, fn) -> tuple[FakeGraph | PiecewiseGraph, Any]:
        import torch.nn.attention.flex_attention as flex
        # Eager FlexAttention wraps its op in torch.compile, which cannot run under a
        # dispatch mode; this torch switch calls the op directly, so it is recorded as one.
        saved = flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG
        flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True
        self._pieces = []
        try:
            self._recorder = _Recorder().__enter__()
            try:
                out = fn()
            finally:
                self._recorder.__exit__(None, None, None)
            pieces = self._pieces + [FakeGraph(self._recorder.ops)]
        finally:
            flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = saved
            self._pieces = None
        self.num_captures += 1
        # tensors the replays refresh in place
        return (pieces[0] if len(pieces) == 1 else PiecewiseGraph(pieces)), out

    def between_pieces(self, fn, *args: torch.Tensor) -> torch.Tensor:
        if self._pieces is None:
            return fn(*args)
        self._recorder.__exit__(None, None, None)
        self._pieces.append(FakeGraph(self._recorder.ops))
        out = fn(*args)              # the recorded ops hold their tensors, this one too
        self._pieces.append(EagerPiece(fn, args, out))
        self._recorder = _Recorder().__enter__()
        return out

    def replay(self, graph: FakeGraph | PiecewiseGraph) -> None:
        if isinstance(graph, PiecewiseGraph):
            replay_pieces(graph, FakeGraph.replay)
        else:
            graph.replay()

    def memory_in_use(self) -> int:
        return 0
