"""What every attention backend is given for one step.

The tensors are views of the model runner's persistent device buffers, already holding this
step's values for `num_tokens_padded` tokens and `num_reqs_padded` requests (padding lanes
point at the null block 0). The numpy arrays are the matching CPU staging copies, so a
metadata builder never has to read the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """Shapes of one model's attention layers and of the KV cache they share."""
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_num_tokens: int       # max_num_batched_tokens, the largest step
    max_blocks_per_seq: int
    dtype: torch.dtype

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5


@dataclass(slots=True)
class StepAttentionInputs:
    num_reqs: int
    num_tokens: int
    num_reqs_padded: int
    num_tokens_padded: int
    uniform_query_len: int | None   # every request has this many query tokens (decode, verify)
    positions: torch.Tensor         # [num_tokens_padded]
    slot_mapping: torch.Tensor      # [num_tokens_padded]
    seq_lens: torch.Tensor          # [num_reqs_padded] tokens in the cache after this step
    query_start_loc: torch.Tensor   # [num_reqs_padded + 1]
    block_table: torch.Tensor       # [num_reqs_padded + 1, max_blocks_per_seq]; the last row is zeros
    positions_cpu: np.ndarray
    seq_lens_cpu: np.ndarray
    query_start_loc_cpu: np.ndarray
    block_table_cpu: np.ndarray
    # [num_reqs_padded] linear-attention state slot per request (0: the null slot)
    state_slots: torch.Tensor | None = None


@dataclass(frozen=True, slots=True)
class PersistentInputs:
    """Full-size persistent device buffers of the runner that a backend may close over.

    FlexAttention's mask_mod must be one function object for the engine's lifetime (a new
    one recompiles), so it indexes these buffers rather than per-step views.
    """
    block_table: torch.Tensor    # [max_num_seqs + 1, max_blocks_per_seq] int32
    positions: torch.Tensor      # [max_num_tokens] int64
