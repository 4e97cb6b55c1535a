"""Layer-level ops of Gated DeltaNet (linear attention) layers over packed variable-length
batches, updating per-request state pools in place.

A step's tokens are packed `[T, ...]`, lane r owning rows query_start_loc[r] ..
query_start_loc[r + 1] (like vLLM's query_start_loc / fla's cu_seqlens); rows past the last
lane's end are padding. Per lane a state slot and a has-initial-state flag select and gate its
saved states (state.py: the two pools' layouts, slot 0 the null slot).

- gating.py: g and beta from the a/b projections, l2norm, the gated output RMSNorm.
- conv.py: the depthwise causal conv + SiLU on the conv state pool (varlen, decode).
- reference.py: the gated delta rule in torch (recurrent, chunked) on the recurrent pool.
- kernels.py: the same through fla's kernels on CUDA (the reference elsewhere), and the rule
  with a state per position for speculative decoding.
- fused_decode.py: a decode step (conv, gating, rule, output norm) as two Triton kernels.
- fused_verify.py: the same for a uniform speculative step, a state per row to the slot group.
- metadata.py: host-side chunk maps (fla's chunk_indices), exact and padded for graphs.
- aligned.py: the batch-invariant mode's rule, chunks at absolute positions, each slot's
  tail of inputs since its last committed boundary in pools of its own; fused_aligned.py its
  GPU kernel and the mode's gated-norm row kernel.
"""
from fullgraph.layers.gdn import fused_aligned, fused_decode, fused_verify
from fullgraph.layers.gdn.aligned import TAIL_INPUTS, aligned_chunk_gated_delta_rule
from fullgraph.layers.gdn.conv import causal_conv1d, causal_conv1d_decode
from fullgraph.layers.gdn.gating import gdn_gating, l2norm, rms_norm_gated
from fullgraph.layers.gdn.kernels import (chunk_gated_delta_rule, decode_gated_delta_rule,
                                          speculative_gated_delta_rule)
from fullgraph.layers.gdn.metadata import (CHUNK_SIZE, chunk_capacity, chunk_metadata,
                                           padded_chunk_indices)
from fullgraph.layers.gdn.reference import (chunk_gated_delta_rule_ref,
                                            recurrent_gated_delta_rule_ref)
from fullgraph.layers.gdn.state import NULL_SLOT, gather_states, slot_groups

__all__ = [
    "CHUNK_SIZE", "NULL_SLOT", "TAIL_INPUTS", "aligned_chunk_gated_delta_rule",
    "causal_conv1d", "causal_conv1d_decode", "chunk_capacity",
    "chunk_gated_delta_rule", "chunk_gated_delta_rule_ref", "chunk_metadata",
    "decode_gated_delta_rule", "fused_aligned", "fused_decode", "fused_verify",
    "gather_states", "gdn_gating", "l2norm", "padded_chunk_indices",
    "recurrent_gated_delta_rule_ref", "rms_norm_gated", "slot_groups",
    "speculative_gated_delta_rule",
]
