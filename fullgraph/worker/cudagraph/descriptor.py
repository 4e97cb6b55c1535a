"""Batch execution descriptors and the dispatcher that pads a step to one.

A descriptor names a padded step shape. The dispatcher picks the smallest captured
descriptor that fits a step; a step larger than every captured one runs eagerly (mode NONE),
padded to a coarse bucket so compiled kernels see few distinct shapes, and is counted. A
mixed step that fits one of the lazy sizes (above the captured ones, up to the token budget)
runs eagerly the first time and leaves that size in `pending`, which the runner captures
before its next step; later steps of the size replay it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from fullgraph.config import CUDAGraphMode

logger = logging.getLogger(__name__)

EAGER_TOKEN_BUCKET = 256   # eager steps above the captured sizes pad to a multiple of this


@dataclass(frozen=True, slots=True)
class BatchExecutionDescriptor:
    mode: CUDAGraphMode
    num_tokens: int
    num_reqs: int
    uniform_query_len: int | None     # 1 = pure decode, 1+k = speculative verify, None = mixed


class Dispatcher:
    def __init__(self, mode: CUDAGraphMode, capture_sizes: tuple[int, ...], max_num_seqs: int,
                 max_num_tokens: int, pad_eager: bool, decode_query_len: int = 1,
                 lazy_sizes: tuple[int, ...] = ()) -> None:
        self.mode = mode
        self.graph_mode = mode.graph_mode     # FULL, or PIECEWISE: the replayed steps' mode
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_tokens
        self.pad_eager = pad_eager
        self.q = decode_query_len
        self.capture_sizes = tuple(sorted(capture_sizes))
        top = max(self.capture_sizes, default=0)
        self.lazy_sizes = (tuple(sorted(s for s in lazy_sizes if top < s <= max_num_tokens))
                           if mode in (CUDAGraphMode.FULL, CUDAGraphMode.PIECEWISE) else ())
        self.pending: set[BatchExecutionDescriptor] = set()     # lazy sizes to capture
        self.num_eager_fallbacks = 0
        self.num_graph_steps = 0
        self._captured: frozenset[BatchExecutionDescriptor] = frozenset()
        # decode steps' graphs by request count, found once: dispatch is on every step's
        # host path, and a descriptor per capture size costs microseconds
        self._decode_graphs: dict[int, BatchExecutionDescriptor] = {}

    @property
    def captured(self) -> frozenset[BatchExecutionDescriptor]:
        return self._captured

    @captured.setter
    def captured(self, descs) -> None:
        self._captured = frozenset(descs)
        self._decode_graphs.clear()

    def descriptors_to_capture(self) -> list[BatchExecutionDescriptor]:
        """Largest first: later (smaller) graphs reuse the shared pool's memory."""
        if self.mode == CUDAGraphMode.NONE:
            return []
        descs = []
        for size in self.capture_sizes:
            if size * self.q <= self.max_num_tokens and size <= self.max_num_seqs:
                descs.append(BatchExecutionDescriptor(self.graph_mode, size * self.q, size, self.q))
            if self.mode != CUDAGraphMode.FULL_DECODE_ONLY and size <= self.max_num_tokens:
                descs.append(BatchExecutionDescriptor(self.graph_mode, size,
                                                      min(size, self.max_num_seqs), None))
        return sorted(set(descs), key=lambda d: (-d.num_tokens, d.uniform_query_len is None))

    def dispatch(self, num_tokens: int, num_reqs: int,
                 uniform_query_len: int | None) -> BatchExecutionDescriptor:
        decode = uniform_query_len == self.q and num_tokens == num_reqs * self.q
        if decode and num_reqs in self._decode_graphs:
            self.num_graph_steps += 1
            return self._decode_graphs[num_reqs]
        for size in self.capture_sizes:
            if decode and size >= num_reqs:
                desc = BatchExecutionDescriptor(self.graph_mode, size * self.q, size, self.q)
            elif not decode and size >= num_tokens:
                desc = BatchExecutionDescriptor(self.graph_mode, size,
                                                min(size, self.max_num_seqs), None)
            else:
                continue
            if desc in self.captured:
                self.num_graph_steps += 1
                if decode:
                    self._decode_graphs[num_reqs] = desc
                return desc
            break
        else:
            desc = self._lazy(num_tokens) if not decode and self.captured else None
            if desc is not None and desc in self.captured:
                self.num_graph_steps += 1
                return desc
            if desc is not None:
                if not self.pending and not self.num_eager_fallbacks:
                    logger.info("a step of %d tokens runs eagerly; a graph of %d tokens is "
                                "captured for the next such step", num_tokens, desc.num_tokens)
                self.pending.add(desc)
                self.num_eager_fallbacks += 1
                return self.eager(num_tokens, num_reqs, uniform_query_len)
        if self.captured:
            if not self.num_eager_fallbacks:
                logger.warning("a step of %d tokens / %d requests fits no captured CUDA graph and "
                               "runs eagerly (further fallbacks are only counted)",
                               num_tokens, num_reqs)
            self.num_eager_fallbacks += 1
        return self.eager(num_tokens, num_reqs, uniform_query_len)

    def has_uniform_graph(self, num_reqs: int) -> bool:
        """Whether a uniform step (`decode_query_len` rows each) of `num_reqs` requests would
        replay a FULL graph; no counting, no capture asked for."""
        size = next((s for s in self.capture_sizes if s >= num_reqs), None)
        return (size is not None and self.graph_mode == CUDAGraphMode.FULL
                and BatchExecutionDescriptor(self.graph_mode, size * self.q, size, self.q)
                in self.captured)

    def _lazy(self, num_tokens: int) -> BatchExecutionDescriptor | None:
        size = next((s for s in self.lazy_sizes if s >= num_tokens), None)
        return None if size is None else BatchExecutionDescriptor(
            self.graph_mode, size, min(size, self.max_num_seqs), None)

    def eager(self, num_tokens: int, num_reqs: int,
              uniform_query_len: int | None) -> BatchExecutionDescriptor:
        """The descriptor of an eager step of this size (padded to a bucket on CUDA)."""
        decode = uniform_query_len == self.q and num_tokens == num_reqs * self.q
        if not self.pad_eager:
            return BatchExecutionDescriptor(CUDAGraphMode.NONE, num_tokens, num_reqs,
                                            uniform_query_len)
        if decode:
            return BatchExecutionDescriptor(CUDAGraphMode.NONE, num_tokens, num_reqs, self.q)
        padded = min(-(-num_tokens // EAGER_TOKEN_BUCKET) * EAGER_TOKEN_BUCKET, self.max_num_tokens)
        return BatchExecutionDescriptor(CUDAGraphMode.NONE, padded,
                                        min(max(num_reqs, padded), self.max_num_seqs), None)
