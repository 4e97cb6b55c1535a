"""Host-side chunk maps for the chunked gated delta rule over packed sequences.

The chunked kernels (fla's, and `chunk_gated_delta_rule_ref`) run one program per (sequence,
64-token chunk of it) and take that list as `chunk_indices`: row i is (sequence index, chunk
index within the sequence), sequences in order. Given only `cu_seqlens`, fla builds it itself
from the lengths read on the host (`prepare_chunk_indices`): a GPU->CPU sync per call, which a
CUDA graph cannot contain. The engine knows `query_start_loc` on the host before the step, so
it builds the map here and copies it with the step's other inputs, as vLLM's GDN metadata
builder does (vllm-project/vllm#38361).

A captured graph fixes the map's length. `padded_chunk_indices` fills a fixed capacity
(`chunk_capacity`: the most chunks any step of that padded shape can have). Its rows past the
real chunks name a chunk of the last lane that starts past that lane's end: fla's kernels
return or mask everything for a chunk whose first token is past its sequence's end, and the
reference sees only empty tokens, so those rows compute nothing. They come last, so every real
chunk keeps the global index at which fla's chunk_fwd_o looks up its state
(`chunk_offsets[seq] + i`, which fla derives from `cu_seqlens` on the device, without a sync).

Everything here is numpy on the host; the arrays are int32, `[rows, 2]` C-contiguous.
"""
from __future__ import annotations

import numpy as np

CHUNK_SIZE = 64     # fla's FLA_CHUNK_SIZE for the gated delta rule (vLLM uses the same)


def chunk_counts(query_start_loc: np.ndarray, chunk_size: int = CHUNK_SIZE) -> np.ndarray:
    """Chunks per sequence, ceil(len / chunk_size) (0 for an empty lane): int64 [N]."""
    lens = np.diff(np.asarray(query_start_loc, dtype=np.int64))
    return (lens + chunk_size - 1) // chunk_size


def chunk_metadata(query_start_loc: np.ndarray,
                   chunk_size: int = CHUNK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """fla's `prepare_chunk_indices` and `prepare_chunk_offsets` of `query_start_loc` [N+1].

    Returns (chunk_indices int32 [num_chunks, 2] = (sequence, chunk within it), chunk_offsets
    int32 [N+1] = the index of each sequence's first chunk, then num_chunks).
    """
    counts = chunk_counts(query_start_loc, chunk_size)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    seq = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    within = np.arange(offsets[-1], dtype=np.int64) - offsets[seq]
    indices = np.stack([seq, within], axis=1).astype(np.int32)
    return indices, offsets.astype(np.int32)


def chunk_capacity(num_tokens: int, num_seqs: int, chunk_size: int = CHUNK_SIZE) -> int:
    """The most chunks `num_seqs` lanes holding `num_tokens` tokens in all can have.

    Each lane adds at most one partial chunk: sum(ceil(l / c)) <= (T + N * (c - 1)) // c; and
    every chunk holds a token. At least 1, so the kernels' grids are never empty.
    """
    bound = (num_tokens + num_seqs * (chunk_size - 1)) // chunk_size
    return max(1, min(num_tokens, bound))


def padded_chunk_indices(query_start_loc: np.ndarray, capacity: int,
                         chunk_size: int = CHUNK_SIZE,
                         out: np.ndarray | None = None) -> np.ndarray:
    """`chunk_metadata`'s chunk_indices padded to `capacity` rows with empty chunks.

    The padding rows are (last lane, its chunk count): a chunk starting at or past the lane's
    end, so no kernel computes anything for it. `out` (int32 [>= capacity, 2]) is filled in
    place when given, e.g. a pinned staging buffer; its first `capacity` rows are returned.
    """
    indices, _ = chunk_metadata(query_start_loc, chunk_size)
    n = len(indices)
    if n > capacity:
        raise ValueError(f"{n} chunks do not fit a capacity of {capacity}")
    if out is None:
        out = np.empty((capacity, 2), dtype=np.int32)
    rows = out[:capacity]
    rows[:n] = indices
    last = len(query_start_loc) - 2
    rows[n:, 0] = last
    rows[n:, 1] = chunk_counts(query_start_loc[last:last + 2], chunk_size)[0]
    return rows
