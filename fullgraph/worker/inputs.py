"""The model runner's persistent step inputs and how one step's values are written into them.

Everything is staged in pinned host buffers through numpy views (no per-step tensor
allocation) and copied with one non_blocking copy per buffer into persistent device buffers,
up to the step's padded size. Padding lanes get harmless values: token 0 at position 0,
slot 0 of the null block, a zero block-table row, sequence length 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from fullgraph.attention.metadata import PersistentInputs, StepAttentionInputs
from fullgraph.buffers import CpuGpuBuffer
from fullgraph.sampling_params import SamplingParams
from fullgraph.worker.cudagraph.descriptor import BatchExecutionDescriptor
from fullgraph.worker.sampler import SamplingTensors


class RequestState(Protocol):
    """What the runner reads of a request (the engine's `Request` satisfies it)."""
    all_token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]
    sampling_params: SamplingParams
    seed: int


class ScheduledChunk(Protocol):
    request: RequestState
    num_new_tokens: int


@dataclass(slots=True)
class StepInputs:
    desc: BatchExecutionDescriptor
    num_reqs: int
    num_tokens: int
    input_ids: torch.Tensor
    positions: torch.Tensor
    logits_indices: torch.Tensor
    attention: StepAttentionInputs
    sampling: SamplingTensors
    logprob_requests: list[int]      # rows whose request asked for logprobs


class InputBuffers:
    def __init__(self, max_num_seqs: int, max_num_tokens: int, max_blocks_per_seq: int,
                 block_size: int, vocab_size: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        t, r = max_num_tokens, max_num_seqs

        def buf(shape, dtype):
            return CpuGpuBuffer(shape, dtype, device, pin)

        self.block_size = block_size
        self.vocab_size = vocab_size
        self.input_ids = buf((t,), torch.int64)
        self.positions = buf((t,), torch.int64)
        self.slot_mapping = buf((t,), torch.int64)
        self.query_start_loc = buf((r + 1,), torch.int32)
        self.seq_lens = buf((r,), torch.int32)
        self.block_table = buf((r + 1, max_blocks_per_seq), torch.int32)  # + a zero row
        self.logits_indices = buf((r,), torch.int64)
        self.temperature = buf((r,), torch.float32)
        self.top_k = buf((r,), torch.int32)
        self.top_p = buf((r,), torch.float32)
        self.seeds = buf((r,), torch.int64)
        self.sample_positions = buf((r,), torch.int64)

    def persistent(self) -> PersistentInputs:
        return PersistentInputs(self.block_table.gpu, self.positions.gpu)

    def prepare(self, chunks: Sequence[ScheduledChunk], desc: BatchExecutionDescriptor) -> StepInputs:
        n_req, n_tok = len(chunks), sum(c.num_new_tokens for c in chunks)
        r_pad, t_pad = desc.num_reqs, desc.num_tokens
        ids, pos, bt = self.input_ids.np, self.positions.np, self.block_table.np
        qsl, seq = self.query_start_loc.np, self.seq_lens.np
        temp, top_k, top_p = self.temperature.np, self.top_k.np, self.top_p.np
        seeds = self.seeds.np
        logprob_rows = []
        max_logprobs = -1
        start = 0
        qsl[0] = 0
        for i, c in enumerate(chunks):
            req, n = c.request, c.num_new_tokens
            done = req.num_computed_tokens
            ids[start:start + n] = req.all_token_ids[done:done + n]
            pos[start:start + n] = np.arange(done, done + n)
            blocks = req.block_ids
            bt[i, :len(blocks)] = blocks
            bt[i, len(blocks):] = 0
            start += n
            qsl[i + 1] = start
            seq[i] = done + n
            sp = req.sampling_params
            temp[i] = sp.temperature
            top_k[i] = sp.top_k if sp.top_k > 0 else self.vocab_size
            top_p[i] = sp.top_p
            seeds[i] = req.seed
            if sp.logprobs is not None:
                logprob_rows.append(i)
                max_logprobs = max(max_logprobs, sp.logprobs)
        # padding lanes
        ids[n_tok:t_pad] = 0
        pos[n_tok:t_pad] = 0
        bt[n_req:r_pad + 1] = 0
        seq[n_req:r_pad] = 0
        if desc.uniform_query_len is not None:   # padded requests keep the uniform query length
            qsl[n_req + 1:r_pad + 1] = n_tok + desc.uniform_query_len * np.arange(1, r_pad - n_req + 1)
        else:
            qsl[n_req + 1:r_pad + 1] = n_tok
        temp[n_req:r_pad] = 0.0
        top_k[n_req:r_pad] = self.vocab_size
        top_p[n_req:r_pad] = 1.0
        seeds[n_req:r_pad] = 0
        # derived, vectorized
        req_of_token = np.repeat(np.arange(n_req), np.diff(qsl[:n_req + 1]))
        slots = self.slot_mapping.np
        slots[:n_tok] = bt[req_of_token, pos[:n_tok] // self.block_size].astype(np.int64) \
            * self.block_size + pos[:n_tok] % self.block_size
        slots[n_tok:t_pad] = 0
        logits_idx = self.logits_indices.np
        logits_idx[:n_req] = qsl[1:n_req + 1] - 1
        logits_idx[n_req:r_pad] = 0
        self.sample_positions.np[:r_pad] = seq[:r_pad]
        # one non_blocking copy per buffer
        attention = StepAttentionInputs(
            num_reqs=n_req, num_tokens=n_tok, num_reqs_padded=r_pad, num_tokens_padded=t_pad,
            uniform_query_len=desc.uniform_query_len,
            positions=self.positions.copy_to_gpu(t_pad),
            slot_mapping=self.slot_mapping.copy_to_gpu(t_pad),
            seq_lens=self.seq_lens.copy_to_gpu(r_pad),
            query_start_loc=self.query_start_loc.copy_to_gpu(r_pad + 1),
            block_table=self.block_table.copy_to_gpu(r_pad + 1),
            positions_cpu=pos, seq_lens_cpu=seq, query_start_loc_cpu=qsl, block_table_cpu=bt)
        sampling = SamplingTensors(
            temperature=self.temperature.copy_to_gpu(r_pad), top_k=self.top_k.copy_to_gpu(r_pad),
            top_p=self.top_p.copy_to_gpu(r_pad), seeds=self.seeds.copy_to_gpu(r_pad),
            positions=self.sample_positions.copy_to_gpu(r_pad),
            all_greedy=not bool((temp[:n_req] > 0).any()),
            any_top_k_top_p=bool(((top_k[:n_req] < self.vocab_size) | (top_p[:n_req] < 1.0)).any()),
            num_logprobs=max_logprobs)
        return StepInputs(desc, n_req, n_tok, self.input_ids.copy_to_gpu(t_pad),
                          attention.positions, self.logits_indices.copy_to_gpu(r_pad),
                          attention, sampling, logprob_rows)
