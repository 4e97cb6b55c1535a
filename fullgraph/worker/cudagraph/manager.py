"""The CUDA graph manager: captures and replays full-step graphs. It knows no model.

It is given keys to capture (hashable; the runner uses batch descriptors) and a
`create_forward_fn(key, warmup)` that returns `(fn, attention_state)`. It runs
`create_forward_fn(key, warmup=True)`'s fn eagerly for every key (kernels compile there),
then captures `create_forward_fn(key, warmup=False)`'s fn for every key, in the order given
(the runner gives largest first), into one memory pool shared by every graph. The two calls
build *separate* attention state (as vLLM's fix for FULL graphs with a lazily initializing
backend does): a backend that initializes lazily on its first run (planning, workspaces, an
"initialized" flag) would otherwise be captured with the initialization already done, and
the graph would replay kernels that read buffers it never fills. The states come back as
`{key: AttentionStatePair}` for components that capture later against the same batch (a
drafter's prefill graphs).

Given `compile_ahead` (a context manager factory, worker/compilers.py's
`triton_compile_ahead`), the warmups run inside it: there a launch that would compile a
kernel is skipped and the kernel compiled elsewhere, side by side with the others, and the
context's exit waits for them and loads them, so every kernel is ready before capture.
"""
from __future__ import annotations

import gc
import logging
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from tqdm import tqdm

logger = logging.getLogger(__name__)

ForwardFn = Callable[[], Any]
CreateForwardFn = Callable[[Hashable, bool], tuple[ForwardFn, Any]]


@dataclass(slots=True)
class AttentionStatePair:
    warmup: Any
    captured: Any


class GraphRuntime(Protocol):
    """How graphs are made: real CUDA graphs, or `FakeGraphRuntime` for CPU tests."""

    def capture(self, fn: ForwardFn) -> tuple[Any, Any]:
        """Record `fn`; return (graph, fn's outputs, which every replay refreshes). Where
        `fn` calls `between_pieces`, the graph is a `PiecewiseGraph`."""

    def between_pieces(self, fn: Callable[..., torch.Tensor],
                       *args: torch.Tensor) -> torch.Tensor:
        """Run `fn(*args)` outside the graph being captured (PIECEWISE mode: attention;
        `args`: the tensors the pieces computed for it): what was captured so far becomes one
        piece, `fn` runs eagerly now and again at every replay (its result copied into the
        tensor it returned now), and capture goes on in a next piece. Outside a capture it
        just runs `fn(*args)`."""

    def replay(self, graph: Any) -> None: ...

    def memory_in_use(self) -> int: ...


@dataclass(slots=True)
class EagerPiece:
    fn: Callable[..., torch.Tensor]
    args: tuple[torch.Tensor, ...]
    out: torch.Tensor


@dataclass(slots=True)
class PiecewiseGraph:
    """Graph pieces and the eager calls between them, in order (PIECEWISE mode)."""
    pieces: list[Any]


def replay_pieces(graph: PiecewiseGraph, replay_piece: Callable[[Any], None]) -> None:
    for piece in graph.pieces:
        if isinstance(piece, EagerPiece):
            piece.out.copy_(piece.fn(*piece.args))
        else:
            replay_piece(piece)


def unowned(t: torch.Tensor) -> torch.Tensor:
    """A tensor on `t`'s memory that does not keep it allocated (torch's CUDA graph trees
    hold their outputs the same way). A PIECEWISE eager call reads its inputs and writes its
    output in the graph pool at the addresses they had during the capture; held by their
    owners, every graph would keep every layer's attention input and output (GiBs across the
    capture sizes). Freed, later pieces and graphs reuse the memory, which is safe because a
    replay runs its pieces and eager calls in capture order and graphs never replay at once."""
    storage = torch._C._construct_storage_from_data_pointer(
        t.untyped_storage().data_ptr(), t.device, t.untyped_storage().nbytes())
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        storage, t.storage_offset(), t.shape, t.stride())


@contextmanager
def collector_paused(collect: bool = True) -> Iterator[None]:
    """Python's cycle collector run now (unless not `collect`), then off until the block ends
    (the captures): run during a capture, it could free an earlier engine's objects whose
    destructors call CUDA in ways a capture forbids (freeing pinned host memory
    synchronizes), which invalidates the capture. torch.cuda.graph collects before each
    capture for the same reason; here once for all of a call's captures. On the GPU a second
    engine's capture in one process failed now and then before this, and not since
    (docs/benchmarks.md, twenty-sixth and twenty-seventh sessions). Pausing is what keeps the
    collector out of a capture; the collection first frees such garbage early. Lazy captures,
    between a server's steps, skip it: in a served process a full collection is a long
    pause for every running request (docs/benchmarks.md, thirtieth session)."""
    if collect:
        gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class CUDAGraphRuntime:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)
        self._pieces: list[Any] | None = None      # of the capture in progress
        self._graph: torch.cuda.CUDAGraph | None = None

    def capture(self, fn: ForwardFn) -> tuple[Any, Any]:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()          # what the allocator holds free, the pool may use
        self._pieces = []
        try:
            with torch.cuda.stream(self.stream):
                self._begin()
                try:
                    out = fn()
                finally:                  # never leave the stream capturing
                    self._graph.capture_end()
        finally:
            pieces, self._pieces = self._pieces + [self._graph], None
        torch.cuda.synchronize(self.device)
        return (pieces[0] if len(pieces) == 1 else PiecewiseGraph(pieces)), out

    def _begin(self) -> None:
        self._graph = torch.cuda.CUDAGraph()
        self._graph.capture_begin(pool=self.pool)

    def between_pieces(self, fn: Callable[..., torch.Tensor],
                       *args: torch.Tensor) -> torch.Tensor:
        """`fn(*args)` eagerly between two graph pieces (`args`: the tensors a piece
        computed for it). Its output tensor is allocated in the pool as the next piece begins
        (the capture only records, so it needs no value yet); each replay copies into it."""
        if self._pieces is None:
            return fn(*args)
        self._graph.capture_end()
        self._pieces.append(self._graph)
        result = fn(*args)
        self._begin()
        out = torch.empty_like(result)
        self._pieces.append(EagerPiece(fn, tuple(map(unowned, args)), unowned(out)))
        return out

    def replay(self, graph: Any) -> None:
        if isinstance(graph, PiecewiseGraph):
            replay_pieces(graph, lambda g: g.replay())
        else:
            graph.replay()

    def memory_in_use(self) -> int:
        """Device memory in use with the allocator's cached free blocks released first, so
        that a capture's report is what its graphs hold: each capture releases them (above),
        and a lazy capture after eager steps read as negative without this."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free


@dataclass(frozen=True, slots=True)
class CaptureReport:
    num_graphs: int
    seconds: float
    memory_bytes: int
    warmup_seconds: float = 0.0    # of `seconds`: the eager warmup runs (compiles happen here)

    def merged(self, other: CaptureReport) -> CaptureReport:
        """Two captures (into one pool) as one report."""
        return CaptureReport(self.num_graphs + other.num_graphs, self.seconds + other.seconds,
                             self.memory_bytes + other.memory_bytes,
                             self.warmup_seconds + other.warmup_seconds)


class CUDAGraphManager:
    def __init__(self, runtime: GraphRuntime,
                 compile_ahead: Callable[[], AbstractContextManager[Any]] | None = None) -> None:
        self.runtime = runtime
        self.compile_ahead = compile_ahead
        self.graphs: dict[Hashable, tuple[Any, Any]] = {}
        self.num_replays = 0

    def capture(self, keys: Sequence[Hashable], create_forward_fn: CreateForwardFn,
                progress: bool = True, warmup_order: Sequence[Hashable] | None = None,
                collect: bool = True
                ) -> tuple[dict[Hashable, AttentionStatePair], CaptureReport]:
        """Warm up every key (in `warmup_order`, the same keys; default `keys`' order), then
        capture them in `keys`' order (`collect`: `collector_paused`'s)."""
        if warmup_order is not None and Counter(warmup_order) != Counter(keys):
            raise ValueError("warmup_order must hold the same keys as keys")
        mem0, t0 = self.runtime.memory_in_use(), time.perf_counter()
        warm_states: dict[Hashable, Any] = {}
        with (self.compile_ahead or nullcontext)():
            for key in tqdm(warmup_order or keys, desc="Warming up", unit="graph",
                            disable=not progress or not keys):
                w0 = time.perf_counter()
                fn, warm_states[key] = create_forward_fn(key, True)
                fn()
                if time.perf_counter() - w0 > 0.5:    # a compile: say which shape paid for it
                    logger.info("warmup of %s took %.1f s", key, time.perf_counter() - w0)
        warmup = time.perf_counter() - t0
        pairs: dict[Hashable, AttentionStatePair] = {}
        kind = ("CUDA graphs" if isinstance(self.runtime, CUDAGraphRuntime)
                else "emulated graphs (fake runtime)")
        with collector_paused(collect):
            for key in tqdm(keys, desc=f"Capturing {kind}", unit="graph",
                            disable=not progress or not keys):
                fn, state = create_forward_fn(key, False)
                self.graphs[key] = self.runtime.capture(fn)
                pairs[key] = AttentionStatePair(warm_states[key], state)
        report = CaptureReport(len(keys), time.perf_counter() - t0,
                               self.runtime.memory_in_use() - mem0, warmup)
        if keys:
            logger.info("captured %d %s in %.1f s (%.1f s of it warming up, where "
                        "kernels compile) using %.2f GiB", report.num_graphs, kind,
                        report.seconds, warmup, report.memory_bytes / 2**30)
        return pairs, report

    def has(self, key: Hashable) -> bool:
        return key in self.graphs

    def replay(self, key: Hashable) -> Any:
        graph, out = self.graphs[key]
        self.runtime.replay(graph)
        self.num_replays += 1
        return out
