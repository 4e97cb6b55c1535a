"""FlexAttention over the paged KV cache.

The cache is one long KV sequence per layer, `[1, Hkv, num_blocks * block_size, D]`, and a
BlockMask lists which physical KV blocks each query block may visit. Two layouts:

* decode (every request has the same query length q): on CUDA with compilation on, our
  Triton paged decode kernel (attention/paged_decode.py: one kernel per layer, no compile
  per batch size), which for 2+ requests and more than one KV split also starts from the
  qkv projection (`forward_qkv`, attention/paged_decode_qk.py; `fuse_qk_norm_rope` says
  where that measured faster — docs/benchmarks.md, fifth and sixth sessions). Otherwise,
  compiled (and for queries too long for that kernel), flex decoding: one batch row per
  request, `q [R, Hq, q, D]`; the block table *is* `kv_indices`. Flex decoding compiles per
  batch size, so the rows are padded to a power of two (empty rows: no KV blocks) and a few
  compiles serve every decode graph; SPLIT_KV is sized to keep every SM busy (inductor's
  default gives batch 32 a single split: 2.3x slower on an H200, benchmarks/probes).
* mixed (prefill chunks and decodes together): all tokens packed in one row
  `q [1, Hq, T, D]`, a doc id per token, and per 16-token query block the union of the
  block-table entries of the requests in it (built on the host, vectorized).

The mask_mod maps a physical KV position to its logical position through `block_logical`
(physical block -> index in its block table; prefix-shared blocks have the same index in
every sharer) and checks that the block belongs to the query's request and is causal. It is
exact on its own: a listed block may be another request's of the same query block.

Uncompiled (the CPU), FlexAttention is not called at all: eager FlexAttention ignores the
block sparsity and scores every query against the whole cache, so a CPU step cost what the
cache did. Both layouts go instead through
attention/gathered.py, which gathers only the blocks the step's rows see (the block table's
rows; the per-query-block lists `prepare` builds) and applies the same mask with SDPA, over
the step's own extent, or inside a recorded graph the bound its padded shape allows.

Every tensor here is allocated once at its maximum size; steps fill leading slices
(`copy_to_persistent`), and the BlockMask's `seq_lengths` depend only on the padded shape, so
warmup, capture and replay of a shape compile once (flex decoding: once per power-of-two row
count; packed: once for all token counts; the Triton decode kernel: no torch.compile).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from fullgraph.attention import paged_decode as paged
from fullgraph.attention import paged_decode_qk as paged_qk
from fullgraph.attention.backend import KVCache, QKNormRope
from fullgraph.attention.gathered import GatheredAttention, GatheredMetadata
from fullgraph.attention.metadata import AttentionSpec, PersistentInputs, StepAttentionInputs
from fullgraph.buffers import CpuGpuBuffer, copy_to_persistent
from fullgraph.layers.launch import next_power_of_2
from fullgraph.layers.pdl import inductor_options
from fullgraph.layers.policy import DEFAULT_POLICY, KernelPolicy

MIXED_Q_BLOCK = 16     # query block of the packed layout; small so few requests share one
# Compiled packed layout: steps run with at least this many query rows (the rest padding).
# Inductor lowers shorter queries to flex decoding (a guard on 128 <= T) and specializes a
# single query block, so without it the packed kernel compiled three times, not once.
MIXED_MIN_TOKENS = 128
DECODE_Q_BLOCK = 128   # any size >= the query length: one query block per request row
DECODE_PAD_MAX_Q = 8   # decode rows are padded to a power of two up to this query length
CTAS_PER_SM = 8        # flex decoding's SPLIT_KV aims at this many programs per SM
MAX_SPLIT_KV = 32


# The packed layout compiles once for every token count (checked on an H200: 3 token counts,
# 2 compiles — the first call specializes, the second goes dynamic). Decode cannot: flex
# decoding needs a static batch.
DYNAMIC_MIXED = True


def _flex_decode(*args, **kwargs):
    return flex_attention(*args, **kwargs)


def _flex_mixed(*args, **kwargs):    # its own code object: its own compile cache
    return flex_attention(*args, **kwargs)


def decode_rows(num_reqs: int, query_len: int, max_rows: int) -> int:
    """Rows the decode kernel runs with: a power of two, so few shapes compile."""
    if query_len > DECODE_PAD_MAX_Q:
        return num_reqs
    return min(next_power_of_2(num_reqs), max_rows)


def split_kv(rows: int, num_kv_heads: int, num_sms: int) -> int:
    """KV splits per (row, kv head): a power of two giving ~CTAS_PER_SM programs per SM."""
    per_head = CTAS_PER_SM * num_sms / (rows * num_kv_heads)
    return max(1, min(MAX_SPLIT_KV, 1 << max(0, math.floor(math.log2(max(per_head, 1))))))


@dataclass(slots=True)
class FlexMetadata:
    block_mask: BlockMask
    decode: bool
    num_reqs: int            # decode layout: the step's (padded) requests
    rows: int                # decode layout: kernel rows (num_reqs padded to a power of two)
    query_len: int           # decode: per request; packed: the kernel's query rows
    kernel_options: dict | None


@dataclass(slots=True)
class PagedDecodeMetadata:
    num_reqs: int            # the step's (padded) requests
    query_len: int
    num_splits: int
    seq_lens: torch.Tensor   # views of the runner's persistent buffers
    block_table: torch.Tensor
    fuse_qk: bool            # q/k norm, RoPE and the K/V store inside the kernel


def fuse_qk_norm_rope(num_reqs: int, num_splits: int) -> bool:
    """Whether decode attention starts from the qkv projection (attention/paged_decode_qk.py).

    Measured on an H100, same machine, Qwen3-0.6B shapes (docs/benchmarks.md, sixth
    session): batch 2 / 4 / 8 / 16 (16 / 8 / 4 / 2 splits) 8 / 6 / 9 / 3.5% faster per
    step; batch 1 1-4% slower; one split (batch 24 and up) 0-5% slower, most at 128."""
    return num_reqs > 1 and num_splits > 1


class FlexAttentionBackend:
    name = "flex"
    supports_cudagraph = True
    # in the mode, get_backend_class resolves "flex" to attention/invariant.py instead
    supports_batch_invariant = False

    def __init__(self, spec: AttentionSpec, device: torch.device, buffers: PersistentInputs,
                 compile: bool = False, policy: KernelPolicy = DEFAULT_POLICY) -> None:
        policy.require("the flex backend's normal path", self.supports_batch_invariant)
        self.spec = spec
        bs, nb = spec.block_size, spec.num_blocks
        rows = spec.max_num_seqs + 1
        self.kv_len = nb * bs
        pin = device.type == "cuda"
        block_table, positions = buffers.block_table, buffers.positions
        self.block_table = block_table
        self.block_logical = torch.zeros(nb, dtype=torch.int32, device=device)
        self.column_ids = torch.arange(spec.max_blocks_per_seq, dtype=torch.int32,
                                       device=device).repeat(rows)
        # decode layout
        self.decode_kv_num_blocks = torch.zeros(rows, dtype=torch.int32, device=device)
        self.q_offset = torch.zeros(rows, dtype=torch.int32, device=device)
        self.q_pad = torch.zeros(spec.max_num_seqs * DECODE_PAD_MAX_Q * spec.num_heads
                                 * spec.head_dim, dtype=spec.dtype, device=device)
        self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                        if device.type == "cuda" else 0)
        # decode layout, Triton kernel
        self.group = spec.num_heads // spec.num_kv_heads
        self.paged = compile and paged.supported(device, spec.head_dim)
        if self.paged:
            splits = [(r, paged.decode_splits(r, spec.num_kv_heads, self.num_sms))
                      for r in range(1, spec.max_num_seqs + 1)]
            programs = max([r * spec.num_kv_heads * s for r, s in splits if s > 1], default=1)
            self.workspace = paged.PagedDecodeWorkspace(rows, spec.num_kv_heads,
                                                        paged.MAX_QUERY_ROWS, programs,
                                                        spec.head_dim, device)
        # mixed layout
        self.min_tokens = MIXED_MIN_TOKENS if compile else 1
        max_tokens = max(spec.max_num_tokens, self.min_tokens)
        max_q_blocks = -(-max_tokens // MIXED_Q_BLOCK)
        self.width = min(nb, MIXED_Q_BLOCK * spec.max_blocks_per_seq)
        self.doc_ids = CpuGpuBuffer((max_tokens,), torch.int32, device, pin)
        self.mixed_kv_num_blocks = CpuGpuBuffer((max_q_blocks,), torch.int32, device, pin)
        self.mixed_kv_indices = CpuGpuBuffer((max_q_blocks, self.width), torch.int32, device, pin)
        # The packed kernel compiles dynamic in the token count; the persistent buffers behind
        # its inputs keep static sizes, or duck sizing ties one to a token count that happens
        # to equal it (512 query blocks == 512 tokens) and the next count recompiles. Not
        # `block_logical`, sized by the KV cache: the runner's memory-profiling step runs with
        # a small cache, and a static size made the real cache compile the kernel again
        # (1.3 s of cold capture on an H100, seventh session).
        for buf in (self.doc_ids.gpu, self.mixed_kv_num_blocks.gpu, self.mixed_kv_indices.gpu,
                    block_table, positions):
            torch._dynamo.mark_static(buf)

        block_logical, q_offset, doc_ids = self.block_logical, self.q_offset, self.doc_ids.gpu

        def decode_mask(b, h, q_idx, kv_idx):
            phys = kv_idx // bs
            lb = block_logical[phys]
            owned = block_table[b, lb] == phys
            return owned & (lb * bs + kv_idx % bs <= q_offset[b] + q_idx)

        def mixed_mask(b, h, q_idx, kv_idx):
            req = doc_ids[q_idx]
            phys = kv_idx // bs
            lb = block_logical[phys]
            owned = block_table[req, lb] == phys
            return owned & (lb * bs + kv_idx % bs <= positions[q_idx])

        self.decode_mask, self.mixed_mask = decode_mask, mixed_mask
        # The Triton kernel's tiles must match the BlockMask's blocks (the direct build gives
        # no finer-grained information); autotuning finds no valid choice otherwise.
        self.mixed_kernel_options = {"BLOCK_M": MIXED_Q_BLOCK, "BLOCK_N": bs} if compile else None
        self.compiled = compile
        self.gathered: GatheredAttention | None = None
        if compile:
            # Decode: static shapes, one compile per row count (flex decoding needs a static
            # batch). Packed layout: optionally one compile, dynamic in the token count.
            pdl = inductor_options(device)
            self.attend = torch.compile(_flex_decode, dynamic=False, fullgraph=True,
                                        options=pdl)
            self.attend_mixed = torch.compile(_flex_mixed, dynamic=DYNAMIC_MIXED, fullgraph=True,
                                              options=pdl)
        else:
            # Eager FlexAttention would score the whole cache (module docstring): the step's
            # own blocks are gathered instead (attention/gathered.py).
            self.gathered = GatheredAttention(spec, MIXED_Q_BLOCK, block_table,
                                              self.block_logical, self.doc_ids.gpu,
                                              self.mixed_kv_num_blocks.gpu,
                                              self.mixed_kv_indices.gpu)
            # Tests may still call eager FlexAttention (as the reference); its warning is noise.
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            self.attend = self.attend_mixed = flex_attention

    # ---------------------------------------------------------------- metadata
    def metadata_key(self) -> tuple:
        return (type(self), self.spec.num_heads, self.spec.num_kv_heads, self.paged,
                self.gathered is None)

    def _decode_layout(self, inputs: StepAttentionInputs) -> bool:
        # The gathered path's request rows take any query length (a long prompt alone: one
        # row, not a query block per 16 tokens each gathering its KV again).
        q = inputs.uniform_query_len
        return (q is not None and (q <= DECODE_Q_BLOCK or self.gathered is not None)
                and inputs.num_tokens_padded == q * inputs.num_reqs_padded)

    def prepare(self, inputs: StepAttentionInputs) -> None:
        if self._decode_layout(inputs):
            return                       # the decode layout's metadata is derived on device
        n_tok, n_req = inputs.num_tokens, inputs.num_reqs
        t_pad = max(inputs.num_tokens_padded, self.min_tokens)
        q_lens = np.diff(inputs.query_start_loc_cpu[:n_req + 1])
        doc = self.doc_ids.np[:t_pad]
        doc[:n_tok] = np.repeat(np.arange(n_req, dtype=np.int32), q_lens)
        doc[n_tok:] = n_req          # padding tokens: the all-zero block-table row
        num_q_blocks = -(-t_pad // MIXED_Q_BLOCK)
        counts, indices = self._mixed_kv_blocks(doc[:n_tok], inputs.positions_cpu[:n_tok],
                                                inputs.block_table_cpu, num_q_blocks)
        self.mixed_kv_num_blocks.np[:num_q_blocks] = counts
        used = indices.shape[1]
        self.mixed_kv_indices.np[:num_q_blocks, :used] = indices
        self.doc_ids.copy_to_gpu(t_pad)
        self.mixed_kv_num_blocks.copy_to_gpu(num_q_blocks)
        copy_to_persistent(self.mixed_kv_indices.gpu, self.mixed_kv_indices.cpu[:num_q_blocks, :used])

    def build(self, inputs: StepAttentionInputs
              ) -> FlexMetadata | PagedDecodeMetadata | GatheredMetadata:
        bs = self.spec.block_size
        if self.gathered is not None:
            nqb = -(-max(inputs.num_tokens_padded, self.min_tokens) // MIXED_Q_BLOCK)
            return self.gathered.build(inputs, self._decode_layout(inputs), nqb,
                                       self.mixed_kv_num_blocks.np)
        if self._decode_layout(inputs):
            r, q = inputs.num_reqs_padded, inputs.uniform_query_len
            if self.paged and self.group * q <= paged.MAX_QUERY_ROWS:
                splits = paged.decode_splits(r, self.spec.num_kv_heads, self.num_sms)
                return PagedDecodeMetadata(r, q, splits, inputs.seq_lens, inputs.block_table,
                                           fuse_qk_norm_rope(r, splits))
            rows = decode_rows(r, q, self.spec.max_num_seqs)
            mask = BlockMask.from_kv_blocks(
                self.decode_kv_num_blocks[:rows].view(rows, 1, 1),
                self.block_table[:rows].view(rows, 1, 1, -1), BLOCK_SIZE=(DECODE_Q_BLOCK, bs),
                mask_mod=self.decode_mask, seq_lengths=(q, self.kv_len), compute_q_blocks=False)
            options = ({"SPLIT_KV": split_kv(rows, self.spec.num_kv_heads, self.num_sms)}
                       if self.num_sms and self.compiled else None)
            return FlexMetadata(mask, True, r, rows, q, options)
        t_pad = max(inputs.num_tokens_padded, self.min_tokens)
        nqb = -(-t_pad // MIXED_Q_BLOCK)
        mask = BlockMask.from_kv_blocks(
            self.mixed_kv_num_blocks.gpu[:nqb].view(1, 1, nqb),
            self.mixed_kv_indices.gpu[:nqb].view(1, 1, nqb, -1),
            BLOCK_SIZE=(MIXED_Q_BLOCK, bs), mask_mod=self.mixed_mask,
            seq_lengths=(t_pad, self.kv_len), compute_q_blocks=False)
        return FlexMetadata(mask, False, 1, 1, t_pad, self.mixed_kernel_options)

    def update(self, metadata: FlexMetadata | PagedDecodeMetadata | GatheredMetadata,
               inputs: StepAttentionInputs) -> None:
        if isinstance(metadata, PagedDecodeMetadata):
            return                       # the kernel reads the block table and lengths itself
        gathered = isinstance(metadata, GatheredMetadata)
        if not (gathered and metadata.decode):   # the gathered decode rows are the table's
            rows = inputs.block_table.shape[0]
            self.block_logical.index_put_(
                (inputs.block_table.reshape(-1).long(),),
                self.column_ids[:rows * self.spec.max_blocks_per_seq])
        if gathered:
            self.gathered.update(metadata, inputs)
        elif metadata.decode:
            r, bs = metadata.num_reqs, self.spec.block_size
            torch.floor_divide(inputs.seq_lens + (bs - 1), bs, out=self.decode_kv_num_blocks[:r])
            torch.sub(inputs.seq_lens, metadata.query_len, out=self.q_offset[:r])
            if metadata.rows > r:        # kernel padding rows: no KV blocks, nothing to read
                self.decode_kv_num_blocks[r:metadata.rows].zero_()

    def _mixed_kv_blocks(self, doc: np.ndarray, pos: np.ndarray, block_table: np.ndarray,
                         num_q_blocks: int) -> tuple[np.ndarray, np.ndarray]:
        """Per query block, the distinct physical blocks its tokens may attend to."""
        if len(doc) == 0:
            return np.zeros(num_q_blocks, np.int32), np.zeros((num_q_blocks, 0), np.int32)
        qb = np.arange(len(doc)) // MIXED_Q_BLOCK
        key = qb.astype(np.int64) * (int(doc.max()) + 1) + doc
        last = np.flatnonzero(np.append(key[1:] != key[:-1], True))  # last token of each (qb, req)
        pair_qb, pair_req = qb[last], doc[last]
        n_blocks = pos[last] // self.spec.block_size + 1                                 # causal: up to the last token
        rep = np.repeat(np.arange(len(last)), n_blocks)
        col = np.arange(len(rep)) - np.repeat(np.cumsum(n_blocks) - n_blocks, n_blocks)
        phys = block_table[pair_req[rep], col].astype(np.int64)
        nb = self.spec.num_blocks
        uniq = np.unique(pair_qb[rep].astype(np.int64) * nb + phys)   # shared prefix blocks once
        u_qb, u_phys = uniq // nb, uniq % nb
        counts = np.bincount(u_qb, minlength=num_q_blocks).astype(np.int32)
        cols = np.arange(len(uniq)) - (np.cumsum(counts) - counts)[u_qb]
        indices = np.zeros((num_q_blocks, int(counts.max())), np.int32)
        indices[u_qb, cols] = u_phys
        return counts, indices

    # ---------------------------------------------------------------- attention
    def forward_qkv(self, qkv: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                    slot_mapping: torch.Tensor, prologue: QKNormRope,
                    metadata: FlexMetadata | PagedDecodeMetadata) -> torch.Tensor | None:
        """Decode steps through the Triton kernel where `fuse_qk_norm_rope` chose it: q/k
        norm, RoPE, the K/V store and attention in one kernel (attention/paged_decode_qk.py);
        None otherwise (and for prologues without a q/k norm, which that kernel applies)."""
        if not (isinstance(metadata, PagedDecodeMetadata) and metadata.fuse_qk
                and prologue.q_weight is not None and paged_qk.supported(qkv, kv_cache[0])):
            return None
        p = prologue
        return paged_qk.paged_decode_qk(
            qkv, positions, p.cos, p.sin, p.q_weight, p.k_weight, p.eps, p.num_heads,
            kv_cache[0], kv_cache[1], slot_mapping, metadata.block_table, metadata.seq_lens,
            self.spec.block_size, metadata.query_len, metadata.num_splits, self.spec.scale,
            self.workspace)

    def forward(self, q: torch.Tensor, kv_cache: KVCache,
                metadata: FlexMetadata | PagedDecodeMetadata | GatheredMetadata) -> torch.Tensor:
        if isinstance(metadata, PagedDecodeMetadata):
            return paged.paged_decode(q, kv_cache[0], kv_cache[1], metadata.block_table,
                                      metadata.seq_lens, self.spec.block_size,
                                      metadata.query_len, metadata.num_splits, self.spec.scale,
                                      self.workspace)
        if isinstance(metadata, GatheredMetadata):
            return self.gathered.forward(q, kv_cache, metadata)
        key = kv_cache[0].permute(1, 0, 2).unsqueeze(0)      # [1, Hkv, S, D], a view
        value = kv_cache[1].permute(1, 0, 2).unsqueeze(0)
        t, hq, d = q.shape
        if metadata.decode:
            r, rows, ql = metadata.num_reqs, metadata.rows, metadata.query_len
            query = q.view(r, ql, hq, d)
            if rows > r:
                padded = self.q_pad[:rows * ql * hq * d].view(rows, ql, hq, d)
                padded[:r].copy_(query)
                query = padded
            out = self.attend(query.transpose(1, 2), key, value, block_mask=metadata.block_mask,
                              scale=self.spec.scale, enable_gqa=True,
                              kernel_options=metadata.kernel_options)
            return out[:r].transpose(1, 2).reshape(t, hq, d)
        rows = metadata.query_len            # >= t: at least MIXED_MIN_TOKENS when compiled
        if rows > t:
            # a new tensor, not a persistent buffer: a tensor made outside inference mode
            # has another dispatch key set, which dynamo guards on (one more compile)
            q = F.pad(q, (0, 0, 0, 0, 0, rows - t))
        out = self.attend_mixed(q.transpose(0, 1).unsqueeze(0), key, value,
                                block_mask=metadata.block_mask, scale=self.spec.scale,
                                enable_gqa=True, kernel_options=metadata.kernel_options)
        return out[0, :, :t].transpose(0, 1)
