"""The batch-invariant mode's attention: every token over its own request's KV, in logical
order, in fixed tiles and splits. `paged_attention` is the CPU path and the reference; on the
GPU the backend runs the same structure as one Triton kernel (attention/paged_invariant.py).

attention/gathered.py (the flex backend's CPU path) is not invariant: a query row alone in
SDPA's query block (a decode row, a chunk's last row) takes another path than the same row in
a fuller block, and the packed layout lists a query block's KV blocks by physical id, so a
request's KV order follows the block allocator (docs/batch_invariance.md, section 3). Here a
token's result depends on its own q and its request's K/V only, with one arithmetic for
prefill, mixed and decode steps, which generation == scoring needs. It is the CPU reference
of the GPU kernel (section 6.5); the flex backend resolves to this backend in the mode
(`attention.backend.get_backend_class`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from fullgraph.attention import paged_invariant
from fullgraph.attention.backend import KVCache, QKNormRope
from fullgraph.attention.gathered import recording
from fullgraph.attention.metadata import AttentionSpec, PersistentInputs, StepAttentionInputs
from fullgraph.layers.activation import scalar_path
from fullgraph.layers.policy import KernelPolicy
from fullgraph.layers.qk_norm_rope import qk_norm_rope_store_kv


TOKEN_BLOCK = 64     # tokens per `paged_attention` call of the backend


def _exp(x: torch.Tensor) -> torch.Tensor:
    return scalar_path(torch.exp, x)


def attention_extent(seq_lens: Iterable[int], policy: KernelPolicy) -> int:
    """KV positions the step's attention walks: the longest sequence, in whole splits. Every
    row gets the same number of splits; splits and tiles past a row's position are masked
    and leave its partial sums exactly as they were (x * 1 + 0)."""
    longest = max((int(s) for s in seq_lens), default=1)
    split = policy.attention_split
    return max(1, -(-longest // split)) * split


SplitState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]   # (max, sum, accumulator)


def merge_split(total: SplitState, part: SplitState) -> SplitState:
    """Fold one split's online-softmax state into the running one (float32, [..., D] for
    the accumulator). Splits are always folded one at a time, in split order: then it does
    not matter whether they were computed by one program in turn (a prefill tile) or by
    several programs whose partials the last one merges (a decode step spread over SMs);
    the bits are the same, so a GPU kernel may choose its parallelism from the batch."""
    (m_a, l_a, o_a), (m_b, l_b, o_b) = total, part
    m = torch.maximum(m_a, m_b)
    m_use = torch.where(m == float("-inf"), 0.0, m)                # nothing seen yet
    w_a, w_b = _exp(m_a - m_use), _exp(m_b - m_use)
    return m, l_a * w_a + l_b * w_b, o_a * w_a[..., None] + o_b * w_b[..., None]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slots: torch.Tensor, visible: torch.Tensor, scale: float,
                    policy: KernelPolicy) -> torch.Tensor:
    """Causal attention of every token over its request's KV in logical order.

    q [T, Hq, D]; k_cache, v_cache [slots, Hkv, D]; slots [T, E] the cache slot of each
    token's logical KV positions 0..E-1 (E: `attention_extent`), visible [T, E] which of them
    the token sees (its own request's, at or before its position). Returns [T, Hq, D] in q's
    dtype.

    Per token: the KV positions are cut into splits of `attention_split` tokens; each split
    runs an online softmax over tiles of `attention_tile_for(D)` tokens, in order, from
    scratch; `merge_split` folds the splits in order. Every step is an elementwise op or a
    reduction over the innermost axis of one token's own data (D or the tile), exps go through
    `scalar_path`, and float32 throughout: no value of another token, nor the number of
    tokens, nor whether the token came in a prefill chunk or a decode step can change a bit.
    This is the CPU reference of the unified GPU kernel the doc plans (prefill, mixed and
    decode steps alike).
    """
    t, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    extent = slots.shape[1]
    tile, split = policy.attention_tile_for(d), policy.attention_split
    # one gather per layer: K as [T, Hkv, E, D] (D innermost, reduced by q . k), V as
    # [T, Hkv, D, E] (KV positions innermost, reduced by p . v); masked V is 0, never NaN
    k = k_cache[slots].float().permute(0, 2, 1, 3).contiguous()
    v = torch.where(visible[:, :, None, None], v_cache[slots].float(), 0.0)
    v = v.permute(0, 2, 3, 1).contiguous()
    qg = q.float().view(t, hkv, group, 1, d)
    neg_inf = float("-inf")

    def empty() -> SplitState:
        return (qg.new_full((t, hkv, group), neg_inf), qg.new_zeros(t, hkv, group),
                qg.new_zeros(t, hkv, group, d))

    total = empty()
    for s0 in range(0, extent, split):
        m, l_sum, acc = empty()
        for j0 in range(s0, min(s0 + split, extent), tile):
            j1 = min(j0 + tile, extent)
            score = (qg * k[:, :, None, j0:j1]).sum(-1) * scale          # [T, Hkv, G, tile]
            score = torch.where(visible[:, None, None, j0:j1], score, neg_inf)
            m_new = torch.maximum(m, score.amax(-1))
            m_use = torch.where(m_new == neg_inf, 0.0, m_new)         # rows that saw nothing
            alpha = _exp(m - m_use)
            p = _exp(score - m_use[..., None])
            l_sum = l_sum * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + (p[..., None, :] * v[:, :, None, :, j0:j1]).sum(-1)
            m = m_new
        total = merge_split(total, (m, l_sum, acc))
    _, l_sum, acc = total
    out = acc / torch.where(l_sum == 0.0, 1.0, l_sum)[..., None]       # padding rows: 0
    return out.reshape(t, hq, d).to(q.dtype)


@dataclass(slots=True)
class InvariantAttentionMetadata:
    inputs: StepAttentionInputs
    extent: int                           # KV positions an eager step walks (whole splits)
    bound: int                            # ... and a recorded one: any step of this shape
    slots: torch.Tensor | None = None     # [T, E], made by `update` (CPU)
    visible: torch.Tensor | None = None   # [T, E]
    tiles: tuple[torch.Tensor, ...] = ()  # the kernel's query tiles (GPU, `tile_map`)


class InvariantAttentionBackend:
    """An attention backend (attention/backend.py's contract) whose every token's result
    depends on its own q and its request's K/V only: the batch-invariant mode's, where the
    flex backend's paths (attention/gathered.py's one SDPA call per layer on the CPU;
    FlexAttention and the decode kernels on the GPU) are not invariant.

    On the GPU, `update` lists the step's query tiles for the kernel
    (`paged_invariant.tile_map`), and the q/k prologue runs in one layout for every token
    count (`forward_qkv`). On the CPU, `update` turns the step's persistent inputs into each
    token's request, position and slots of its logical KV positions, with device ops only;
    the extent is a host int fixed before any op: the step's own (eager) or, in a step being recorded into a graph
    (attention/gathered.py's `recording`), the most any request may hold, so replays of any
    content fit. Extra splits are masked, so both give the same bits."""
    name = "batch_invariant"
    supports_cudagraph = True
    supports_batch_invariant = True

    def __init__(self, spec: AttentionSpec, device: torch.device,
                 buffers: PersistentInputs | None = None, compile: bool = False,
                 policy: KernelPolicy = KernelPolicy(batch_invariant=True)) -> None:
        d = spec.head_dim
        if device.type == "cuda" and (paged_invariant.triton is None or d < 32 or d & (d - 1)):
            raise ValueError(f"the batch-invariant attention kernel needs Triton and a head "
                             f"dim that is a power of two >= 32 (got {d})")
        self.spec = spec
        self.device = device
        self.policy = policy
        self.num_sms, self.workspace = 0, None
        if device.type == "cuda":
            self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
            self.workspace = paged_invariant.SplitWorkspace.for_spec(
                spec.num_heads, spec.num_kv_heads, d, spec.max_blocks_per_seq * spec.block_size,
                policy.attention_split, self.num_sms, device)

    def metadata_key(self) -> tuple:
        return type(self), self.spec.num_heads // self.spec.num_kv_heads   # the query tiles

    def prepare(self, inputs: StepAttentionInputs) -> None:
        pass

    def build(self, inputs: StepAttentionInputs) -> InvariantAttentionMetadata:
        lens = inputs.seq_lens_cpu[:inputs.num_reqs]
        most = self.spec.max_blocks_per_seq * self.spec.block_size
        return InvariantAttentionMetadata(inputs, attention_extent(lens, self.policy),
                                          attention_extent([most], self.policy))

    def update(self, meta: InvariantAttentionMetadata, inputs: StepAttentionInputs) -> None:
        if self.device.type == "cuda":
            group = self.spec.num_heads // self.spec.num_kv_heads
            meta.tiles = paged_invariant.tile_map(inputs.query_start_loc,
                                                  inputs.num_reqs_padded,
                                                  inputs.num_tokens_padded,
                                                  paged_invariant.query_tokens(group))
            return
        bs = self.spec.block_size
        e = meta.bound if recording() else meta.extent
        # the padded shape only (a graph replays this for other steps): padding requests
        # have seq_len 0, padding tokens lie past the last request or in a padding request
        t, r = inputs.num_tokens_padded, inputs.num_reqs_padded
        qsl = inputs.query_start_loc[:r + 1].long()
        tok = torch.arange(t, device=self.device)
        req = torch.searchsorted(qsl[1:], tok, right=True)   # a token's request (r: none)
        live = req < r
        req = req.clamp(max=r - 1)
        kv = torch.arange(e, device=self.device)
        column = (kv // bs).clamp(max=inputs.block_table.shape[1] - 1)
        blocks = inputs.block_table[req][:, column].long()                  # [T, E]
        meta.slots = blocks * bs + kv % bs
        pos = inputs.positions[:t].long()
        seq_len = inputs.seq_lens[req].long()
        meta.visible = ((kv[None, :] <= pos[:, None]) & (kv[None, :] < seq_len[:, None])
                        & live[:, None])

    def forward_qkv(self, qkv: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                    slot_mapping: torch.Tensor, p: QKNormRope,
                    meta: InvariantAttentionMetadata) -> torch.Tensor:
        q = qk_norm_rope_store_kv(qkv, positions, p.cos, p.sin, p.q_weight, p.k_weight, p.eps,
                                  p.num_heads, p.num_kv_heads, kv_cache[0], kv_cache[1],
                                  slot_mapping, batch_invariant=True)
        return self.forward(q, kv_cache, meta)

    def forward(self, q: torch.Tensor, kv_cache: KVCache,
                meta: InvariantAttentionMetadata) -> torch.Tensor:
        if q.is_cuda:
            inputs = meta.inputs
            return paged_invariant.invariant_attention(
                q, kv_cache[0], kv_cache[1], inputs.block_table, inputs.seq_lens,
                inputs.positions, meta.tiles, self.spec.block_size, self.spec.scale,
                self.policy, self.workspace, self.num_sms)
        # in blocks of tokens: each token gathers its own KV, so one call over a long
        # prompt would hold [tokens, extent, heads, dim] at once; tokens are independent
        # of each other, so the blocks change no bit
        return torch.cat([
            paged_attention(q[i:i + TOKEN_BLOCK], kv_cache[0], kv_cache[1],
                            meta.slots[i:i + TOKEN_BLOCK], meta.visible[i:i + TOKEN_BLOCK],
                            self.spec.scale, self.policy)
            for i in range(0, q.shape[0], TOKEN_BLOCK)])
