"""The flex backend's uncompiled path (CPU): attention over the step's own KV blocks only.

Eager (uncompiled) FlexAttention ignores the BlockMask's sparsity: it scores every query
against the whole paged cache, `num_blocks * block_size` positions, and evaluates the
mask_mod on all of them; it also runs through `torch.compile(backend="eager")` on every call.
A CPU step therefore cost what the cache cost, not what the batch did (figures:
docs/benchmarks.md, fourteenth session).

This path computes the same attention over a dense gather of the blocks the step may see:

* decode layout (every request has the same query length q, any q): one row per request,
  its first `B` block-table entries gathered into `[R, Hkv, B * block_size, D]`; the mask is
  causality (logical KV position <= the query's position). Positions past a request's
  length are masked, so whatever its table holds there (the null block 0) is never seen.
* packed layout: per 16-token query block, the distinct physical blocks its requests may see
  (the list the flex backend's `prepare` builds for the compiled kernel); the mask is the
  flex mask_mod (the block belongs to the token's request at the logical index
  `block_logical` gives, and is causal) and the list's length (later columns are stale).

The gather lists and the mask are made once a step (`update`), then each layer gathers its K
and V and makes one `scaled_dot_product_attention` call with that boolean mask (a query row
with no visible key, a padding lane, comes out 0, as in FlexAttention).

`B`, the KV extent, is where the cost goes. An eager step takes its own: the longest request
(decode) or the longest query block's list (packed), known on the host. Steps whose ops are
being recorded into a graph (the fake CPU graph runtime, worker/cudagraph/fake.py, or a CUDA
capture) replay those ops later for other steps of the same padded shape, so `B` is then the
bound that shape allows: a request's `max_blocks_per_seq`, and for a query block that times
the requests it can hold (at most 16, at most the padded request count), never more than the
cache. Either way the cost follows the step's tokens and their context, not the cache size
Rows are padded to the widest one, though: a packed
step of many decoding requests and a prefill gives every query block the list of the one
holding the decodes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fullgraph.attention.backend import KVCache
from fullgraph.attention.metadata import AttentionSpec, StepAttentionInputs


def recording() -> bool:
    """Whether the ops running now are recorded for later replays, so their shapes must
    depend on the padded step shape alone: the fake graph runtime records through a torch
    dispatch mode (worker/cudagraph/fake.py); a CUDA graph capture is on the current stream.
    Any other dispatch mode gets the padded-shape bound too: slower, same result. (`build`
    cannot tell: the runner builds a graph's metadata outside the capture, from a dummy
    step.)"""
    if torch._C._len_torch_dispatch_stack() > 0:
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@dataclass(slots=True)
class GatheredMetadata:
    decode: bool
    rows: int                # decode: the step's (padded) requests; packed: query blocks
    row_len: int             # query tokens per row (decode: q; packed: the query block)
    step_blocks: int         # KV blocks per row this step's requests see (from the host)
    bound_blocks: int        # KV blocks per row any step of this padded shape may see
    # Made by `update` (inside a captured graph: recorded, refreshed by each replay)
    kv_blocks: torch.Tensor | None = None   # [rows, B] physical blocks gathered per row
    mask: torch.Tensor | None = None        # [rows, 1, row_len, B * block_size] bool


class GatheredAttention:
    """Builds, refreshes and runs the gathered layouts over the flex backend's buffers.

    It owns no buffers: the block table is the runner's, `block_logical` and the packed
    layout's per-query-block lists (`doc_ids`, `kv_num_blocks`, `kv_indices`) the flex
    backend's, which its `prepare` and `update` fill for the compiled kernel as well."""

    def __init__(self, spec: AttentionSpec, q_block: int, block_table: torch.Tensor,
                 block_logical: torch.Tensor, doc_ids: torch.Tensor,
                 kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor) -> None:
        self.spec = spec
        self.q_block = q_block
        self.block_table = block_table        # [max_num_seqs + 1, max_blocks_per_seq] int32
        self.block_logical = block_logical    # [num_blocks] int32
        self.doc_ids = doc_ids                # [max_tokens] int32, per packed token its row
        self.kv_num_blocks = kv_num_blocks    # [max_q_blocks] int32
        self.kv_indices = kv_indices          # [max_q_blocks, width] int32

    # ---------------------------------------------------------------- metadata
    def build(self, inputs: StepAttentionInputs, decode: bool, num_q_blocks: int,
              kv_num_blocks_cpu) -> GatheredMetadata:
        """Host only: the step's extent from the CPU copies, and the padded shape's bound.
        Packed steps after `prepare`, whose per-query-block counts `kv_num_blocks_cpu` holds."""
        per_seq = self.spec.max_blocks_per_seq
        if decode:
            longest = int(inputs.seq_lens_cpu[:inputs.num_reqs].max(initial=1))
            step = -(-longest // self.spec.block_size)
            return GatheredMetadata(True, inputs.num_reqs_padded, inputs.uniform_query_len,
                                    step, per_seq)
        step = int(kv_num_blocks_cpu[:num_q_blocks].max(initial=1))
        # a query block's list: at most one request per token, each at most a table row,
        # and no block twice (the list's buffer is sized by that too)
        bound = min(self.kv_indices.shape[1],
                    min(self.q_block, inputs.num_reqs_padded) * per_seq)
        return GatheredMetadata(False, num_q_blocks, self.q_block, max(step, 1), bound)

    def update(self, meta: GatheredMetadata, inputs: StepAttentionInputs) -> None:
        """The gather's block lists and the mask, once per step for every layer. Device ops
        only, read from persistent buffers; the extent is a Python int fixed before any op."""
        blocks = meta.bound_blocks if recording() else meta.step_blocks
        bs, device = self.spec.block_size, self.block_table.device
        if meta.decode:
            r, q = meta.rows, meta.row_len
            meta.kv_blocks = inputs.block_table[:r, :blocks]
            kv_pos = torch.arange(blocks * bs, device=device)   # a row's KV positions
            # query i of a request sits at seq_len - q + i (padded requests: seq_len 0, none)
            q_pos = (inputs.seq_lens[:r, None] - q
                     + torch.arange(q, device=device, dtype=torch.int32))
            meta.mask = (kv_pos <= q_pos[..., None]).unsqueeze(1)
            return
        nqb, qb = meta.rows, meta.row_len
        t = inputs.num_tokens_padded
        fill = nqb * qb - t          # the last query block's rows past the step's tokens
        doc = F.pad(self.doc_ids[:t], (0, fill)).view(nqb, qb, 1)
        pos = F.pad(inputs.positions[:t], (0, fill), value=-1).view(nqb, qb, 1, 1)
        phys = self.kv_indices[:nqb, :blocks]
        logical = self.block_logical[phys]                                  # [nqb, B]
        column = torch.arange(blocks, device=device)
        listed = column < self.kv_num_blocks[:nqb, None]                    # [nqb, B]
        owned = (self.block_table[doc, logical[:, None, :]] == phys[:, None, :]) \
            & listed[:, None, :]                                            # [nqb, qb, B]
        offset = torch.arange(bs, device=device)
        causal = (logical[:, None, :, None] * bs + offset) <= pos           # [nqb, qb, B, bs]
        meta.kv_blocks = phys
        meta.mask = (owned[..., None] & causal).view(nqb, 1, qb, blocks * bs)

    # ---------------------------------------------------------------- attention
    def forward(self, q: torch.Tensor, kv_cache: KVCache, meta: GatheredMetadata) -> torch.Tensor:
        t, hq, d = q.shape
        rows, n = meta.rows, meta.row_len
        if rows * n > t:             # packed: the last query block's spare rows
            q = F.pad(q, (0, 0, 0, 0, 0, rows * n - t))
        query = q.view(rows, n, hq, d).transpose(1, 2)                      # [rows, Hq, n, D]
        key, value = (self._gather(c, meta.kv_blocks) for c in kv_cache)    # [rows, Hkv, E, D]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=meta.mask,
                                             scale=self.spec.scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(rows * n, hq, d)[:t]

    def _gather(self, cache: torch.Tensor, kv_blocks: torch.Tensor) -> torch.Tensor:
        """[slots, Hkv, D] cache -> [rows, Hkv, B * block_size, D]: whole blocks, in the
        order of `kv_blocks` (so KV position j of a row is column j // block_size)."""
        bs, (_, hkv, d) = self.spec.block_size, cache.shape
        rows, blocks = kv_blocks.shape
        return cache.view(-1, bs, hkv, d)[kv_blocks].view(rows, blocks * bs, hkv, d) \
            .transpose(1, 2)
