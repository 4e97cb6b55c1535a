"""Step metadata of the linear-attention (Gated DeltaNet) layers, with the backend contract.

Like an attention backend (backend.py): `prepare` does the host work of a step, `build`
makes the metadata object over persistent buffers, `update` refreshes it on the device
(captured inside graphs). What a GDN layer needs per step:
- each lane's state slot (the runner's persistent `state_slots` input) and whether the lane
  continues a saved state: a decode, or a prefill chunk after the first. That flag is
  `seq_len - query_len > 0`, derived on the device in `update`, so nothing new crosses PCIe;
- for steps that are not pure decode, the chunk map of the chunked kernel (fla's
  `chunk_indices`): built on the host from the step's query start locations and copied with
  the step's inputs, padded to a capacity fixed by the padded shape (layers/gdn/metadata.py).
  fla would otherwise derive it from `cu_seqlens` with a GPU->CPU sync, which no graph may
  hold; so a step syncs only to return its sampled tokens.
- under speculative decoding, where each request owns a group of state slots (one per
  verified position, layers/gdn/state.py), each lane's group `write_slots`, derived on the
  device from `state_slots` in `update`; a step whose lanes all have at most that many rows
  (a verify or decode step) needs no chunk map: its rows run token by token.
In the batch-invariant mode (the layers' `kernel_policy`) the layers ignore `decode` and
`chunk_indices`: every step goes through layers/gdn/aligned.py, which derives its chunk map
on the device from the lanes' boundaries (`seq_lens` - query length).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fullgraph.attention.metadata import StepAttentionInputs
from fullgraph.buffers import CpuGpuBuffer
from fullgraph.layers.gdn import chunk_capacity, padded_chunk_indices, slot_groups


@dataclass(slots=True)
class GDNMetadata:
    decode: bool                     # one token per lane: the recurrent (not chunked) rule
    state_slots: torch.Tensor        # [R_pad] views of persistent buffers
    has_initial_state: torch.Tensor  # [R_pad] bool
    query_start_loc: torch.Tensor    # [R_pad + 1]
    chunk_indices: torch.Tensor | None   # [capacity, 2] int32; None for decode
    # [R_pad] each lane's tokens after the step (a view, no work in the normal mode): the
    # batch-invariant mode's layers find each lane's chunk boundary from it
    # (layers/gdn/aligned.py)
    seq_lens: torch.Tensor
    # speculative decoding: [R_pad, m] each lane's slot group (None otherwise), and the rows
    # every lane has at most, where the step's shape bounds them by m (else None)
    write_slots: torch.Tensor | None = None
    short_query_len: int | None = None


class GDNMetadataBuilder:
    def __init__(self, max_num_seqs: int, max_num_tokens: int, device: torch.device,
                 slots_per_request: int = 1) -> None:
        self.chunk_indices = CpuGpuBuffer((chunk_capacity(max_num_tokens, max_num_seqs), 2),
                                          torch.int32, device, device.type == "cuda")
        self.has_initial_state = torch.zeros(max_num_seqs, dtype=torch.bool, device=device)
        self.slots_per_request = m = slots_per_request
        self.write_slots = (torch.zeros(max_num_seqs, m, dtype=torch.int64, device=device)
                            if m > 1 else None)

    @staticmethod
    def _decode(inputs: StepAttentionInputs) -> bool:
        return (inputs.uniform_query_len == 1
                and inputs.num_tokens_padded == inputs.num_reqs_padded)

    def _short_query_len(self, inputs: StepAttentionInputs) -> int | None:
        q = inputs.uniform_query_len
        return q if self.write_slots is not None and q and q <= self.slots_per_request else None

    def prepare(self, inputs: StepAttentionInputs) -> None:
        if self._decode(inputs) or self._short_query_len(inputs):
            return
        r = inputs.num_reqs_padded
        capacity = chunk_capacity(inputs.num_tokens_padded, r)
        padded_chunk_indices(inputs.query_start_loc_cpu[:r + 1], capacity,
                             out=self.chunk_indices.np)
        self.chunk_indices.copy_to_gpu(capacity)

    def build(self, inputs: StepAttentionInputs) -> GDNMetadata:
        r = inputs.num_reqs_padded
        decode = self._decode(inputs)
        short = self._short_query_len(inputs)
        chunks = (None if decode or short else
                  self.chunk_indices.gpu[:chunk_capacity(inputs.num_tokens_padded, r)])
        return GDNMetadata(decode, inputs.state_slots, self.has_initial_state[:r],
                           inputs.query_start_loc, chunks, inputs.seq_lens,
                           None if self.write_slots is None else self.write_slots[:r], short)

    def update(self, metadata: GDNMetadata, inputs: StepAttentionInputs) -> None:
        qsl = inputs.query_start_loc
        torch.gt(inputs.seq_lens, qsl[1:] - qsl[:-1], out=metadata.has_initial_state)
        if metadata.write_slots is not None:
            metadata.write_slots.copy_(slot_groups(inputs.state_slots,
                                                   self.slots_per_request))
