"""Reference backend: gather each request's KV from the cache and call SDPA.

It loops over requests on the host, so it runs eagerly only; it exists to check the flex
backend against and as a fallback. On a CPU the default triton backend (flex's gathered
path there) computes the same attention with one SDPA call a layer over the step's gathered
blocks (attention/gathered.py), which is faster than this per-request loop, and also runs
inside captured (fake) graphs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fullgraph.attention.backend import KVCache
from fullgraph.attention.metadata import AttentionSpec, StepAttentionInputs
from fullgraph.layers.policy import DEFAULT_POLICY, KernelPolicy


@dataclass(slots=True)
class SDPAMetadata:
    inputs: StepAttentionInputs
    slots: list[torch.Tensor]        # per request: the cache slots of positions 0..seq_len-1
    masks: list[torch.Tensor]        # per request: [q_len, seq_len] causal mask


class SDPABackend:
    name = "sdpa"
    supports_cudagraph = False
    # a query row alone in SDPA's query block (decode) takes another path than in a prefill
    supports_batch_invariant = False

    def __init__(self, spec: AttentionSpec, device: torch.device, buffers=None,
                 compile: bool = False, policy: KernelPolicy = DEFAULT_POLICY) -> None:
        policy.require("attention backend 'sdpa'", self.supports_batch_invariant)
        self.spec = spec
        self.device = device

    def metadata_key(self) -> tuple:
        return (type(self),)             # slots and masks: no head count or size in them

    def prepare(self, inputs: StepAttentionInputs) -> None:
        pass

    def update(self, metadata: SDPAMetadata, inputs: StepAttentionInputs) -> None:
        pass

    def build(self, inputs: StepAttentionInputs) -> SDPAMetadata:
        bs = self.spec.block_size
        slots, masks = [], []
        for i in range(inputs.num_reqs):
            seq_len = int(inputs.seq_lens_cpu[i])
            q_len = int(inputs.query_start_loc_cpu[i + 1] - inputs.query_start_loc_cpu[i])
            pos = torch.arange(seq_len, device=self.device)
            blocks = inputs.block_table[i, pos // bs].long()
            slots.append(blocks * bs + pos % bs)
            q_pos = torch.arange(seq_len - q_len, seq_len, device=self.device)
            masks.append(pos[None, :] <= q_pos[:, None])
        return SDPAMetadata(inputs, slots, masks)

    def forward(self, q: torch.Tensor, kv_cache: KVCache, metadata: SDPAMetadata):
        inputs = metadata.inputs
        out = torch.zeros_like(q)
        qsl = inputs.query_start_loc_cpu
        for i, (slots, mask) in enumerate(zip(metadata.slots, metadata.masks)):
            start, end = int(qsl[i]), int(qsl[i + 1])
            qi = q[start:end].transpose(0, 1)                 # [Hq, q_len, D]
            ki = kv_cache[0][slots].transpose(0, 1)           # [Hkv, seq_len, D]
            vi = kv_cache[1][slots].transpose(0, 1)
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=self.spec.scale,
                                                enable_gqa=True)
            out[start:end] = oi.transpose(0, 1)
        return out
