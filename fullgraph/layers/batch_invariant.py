"""Batch-invariant mode (issue 24): the kernel policy and the CPU reference kernels.

In this mode a token's logprobs must be the same bits whatever else shares its step, wherever
it sits in the batch, however the scheduler cut its prompt, and whether its position was
computed by a prefill or a decode step. Every reduction behind a token must therefore have an
order that depends on that token's own data alone. On this CPU (measured, docs/batch_invariance.md)
four of today's ops break that:

* `F.linear` / `torch.matmul`: MKL (float32) and oneDNN (bfloat16) pick their algorithm from
  the row count, so a row's bits change with M (one row is a GEMV, more rows a GEMM with
  other K blockings). Here every row goes through a GEMM call of one fixed shape
  (`KernelPolicy.matmul_block_rows` rows, zero-padded): the same call whatever M is.
* `scaled_dot_product_attention` as attention/gathered.py and sdpa.py call it: a query row
  that sits alone in the kernel's query block (a decode row) takes another path than the
  same row inside a prefill chunk, and the packed layout lists KV blocks by physical id, so
  a request's KV order depends on the block allocator. `paged_attention` walks each token's
  KV in logical order, in fixed tiles and fixed splits, with per-element ops only.
* elementwise transcendental ops (`F.silu`, `sigmoid`): ATen computes contiguous elements
  with a vectorized formula and the rest (a strided input, the tail of a tensor, of a
  thread's share) with a scalar one, and they differ in the last bit. The MLP's silu reads
  the gate half of `gate_up`, a strided view for M > 1 rows and a contiguous one for M = 1,
  so a decode row and the same row in a prefill differ. `scalar_path` sends every element
  through the scalar loop.
* `torch.logsumexp` (the sampler's logprobs): a lone row of a 151,936-token vocabulary is
  summed by two threads, a row among others by one. `compute_logprobs` uses the per-row
  log_softmax kernel instead.

The Gated DeltaNet rule is not invariant to where a prompt is cut unless the cut falls on a
64-token chunk boundary, and decode's recurrent form differs from the chunked one;
`aligned_gated_delta_rule` commits the state only at absolute chunk boundaries and recomputes
the partial chunk, so prefill, chunked prefill and decode give the same bits.

How the policy reaches the ops (the design, docs/batch_invariance.md): it is engine
configuration, frozen, made once from `--batch-invariant` / `FULLGRAPH_BATCH_INVARIANT` /
`LLM(batch_invariant=True)`. The loader stamps it on every module of the model
(`apply_kernel_policy`), whose forwards hand it to the ops they call; the attention backend
and the sampler get it as a constructor / call argument and say whether they support it.
No module global and no per-step state: two engines, one in each mode, can share a process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fullgraph.attention.backend import KVCache
from fullgraph.attention.gathered import recording
from fullgraph.attention.metadata import AttentionSpec, PersistentInputs, StepAttentionInputs
from fullgraph.layers import fused_linear
from fullgraph.layers import linear as linear_ops

ENV_FLAG = "FULLGRAPH_BATCH_INVARIANT"


# ------------------------------------------------------------------------------- the policy
@dataclass(frozen=True, slots=True)
class KernelPolicy:
    """Which kernels the engine may choose, made once per engine.

    `batch_invariant=False` is today's behaviour: kernels are picked from the row count (the
    fastest one measured per shape). `batch_invariant=True` pins every such choice to one
    whose per-row arithmetic does not depend on the rest of the step. The other fields are
    the pinned shapes; they are part of the numerics (two engines agree bit for bit only
    with equal values), so they are fixed constants, never derived from the batch.
    """
    batch_invariant: bool = False
    # rows of every invariant matmul call (the GPU kernel's BLOCK_M)
    matmul_block_rows: int = 64
    # KV tokens per online-softmax step, and per split (a multiple of the tile): a token's
    # attention is the split partials of its logical KV, merged in split order
    attention_tile: int = 32
    attention_split: int = 256
    # the gated delta rule's chunk; the state is committed at multiples of it
    gdn_chunk: int = 64

    def __post_init__(self) -> None:
        for name in ("matmul_block_rows", "attention_tile", "attention_split", "gdn_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"KernelPolicy.{name} must be positive, got {getattr(self, name)}")
        if self.attention_split % self.attention_tile:
            raise ValueError(f"KernelPolicy.attention_split ({self.attention_split}) must be a "
                             f"multiple of attention_tile ({self.attention_tile})")

    @classmethod
    def from_args(cls, batch_invariant: bool | None = None,
                  environ: dict[str, str] | None = None, **shapes: int) -> KernelPolicy:
        """The engine's policy: `batch_invariant` (LLM(batch_invariant=...),
        --batch-invariant / --no-batch-invariant) wins; None reads FULLGRAPH_BATCH_INVARIANT
        once, here, at configuration time ("1"/"true" on, "0"/"false"/unset off)."""
        if batch_invariant is None:
            raw = (os.environ if environ is None else environ).get(ENV_FLAG, "0").strip().lower()
            if raw not in ("0", "1", "true", "false", ""):
                raise ValueError(f"{ENV_FLAG} must be 0 or 1, got {raw!r}")
            batch_invariant = raw in ("1", "true")
        return cls(batch_invariant=batch_invariant, **shapes)

    def require(self, component: str, supported: bool) -> None:
        """ValueError when the mode is on and `component` (a backend, a kernel path) cannot
        keep it: asked-for invariance is never silently dropped."""
        if self.batch_invariant and not supported:
            raise ValueError(f"{component} does not support batch-invariant mode "
                             f"(--batch-invariant / {ENV_FLAG}=1)")

    # The row-count-dependent choices of today's kernels, answered in one place. Normal mode
    # returns today's rule; the mode returns the pinned choice.
    def fuse_prologue(self, rows: int, reduces: bool) -> bool:
        """Whether the op before a projection runs inside the skinny matmul
        (layers/fused_linear.py does it at one row). A prologue that reduces (RMSNorm's
        statistics, per program over K slices) adds in another order than the row kernel
        that serves more rows, so the mode never fuses it; an elementwise one (SiLU-and-mul,
        one rounding either way) may stay fused."""
        return rows == 1 and not (self.batch_invariant and reduces)

    def matmul_calls(self, rows: int) -> list[tuple[int, int]]:
        """(first row, rows) of each matmul call for `rows` rows: one call normally; in the
        mode, blocks of `matmul_block_rows` (the last one zero-padded by the kernel)."""
        if not self.batch_invariant:
            return [(0, rows)] if rows else []
        b = self.matmul_block_rows
        return [(i, min(b, rows - i)) for i in range(0, rows, b)]


DEFAULT_POLICY = KernelPolicy()


def apply_kernel_policy(model: nn.Module, policy: KernelPolicy) -> nn.Module:
    """Stamp `policy` on the model and every submodule (`kernel_policy`), once, at load time:
    the layers' forwards hand it to the ops they call, so no op consults anything global."""
    for module in model.modules():
        module.kernel_policy = policy
    return model


def policy_of(module: Any) -> KernelPolicy:
    return getattr(module, "kernel_policy", DEFAULT_POLICY)


# ------------------------------------------------------------------------------- elementwise
def scalar_path(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """op(x) with every element computed by ATen's scalar loop.

    An elementwise CPU kernel runs a vectorized body and a scalar remainder whose formulas may
    differ in the last bit (F.silu does), and which elements are the remainder depends on the
    tensor's size and on how the work is split between threads. An input that is not
    contiguous sends every element through the scalar loop, so an element's result is a
    function of its value alone. Slower; this is the CPU reference."""
    strided = x.new_empty(x.shape + (2,))
    strided[..., 0] = x
    return op(strided[..., 0])


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on [..., 2 * d], silu through `scalar_path`."""
    gate, up = gate_up.chunk(2, dim=-1)
    return scalar_path(F.silu, gate) * up


# ------------------------------------------------------------------------------- matmul
def invariant_matmul(x: torch.Tensor, weight: torch.Tensor, policy: KernelPolicy) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T, every row computed by an `F.linear` call of the same shape
    [matmul_block_rows, K]: the last block is zero-padded, and each block is a fresh
    allocation (MKL's results may depend on the input's alignment, which a view of a larger
    tensor would vary with the block's offset). A row's bits then depend on the row and the
    weight only (measured: the row's place inside the block does not change them)."""
    m, k = x.shape
    out = x.new_empty(m, weight.shape[0])
    for start, n in policy.matmul_calls(m):
        block = x.new_zeros(policy.matmul_block_rows, k)
        block[:n] = x[start:start + n]
        out[start:start + n] = F.linear(block, weight)[:n]
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           policy: KernelPolicy) -> torch.Tensor:
    """The projection every model layer calls (x [..., K]); invariant in the mode."""
    if not policy.batch_invariant:
        return linear_ops.linear(x, weight, bias)
    y = invariant_matmul(x.reshape(-1, x.shape[-1]), weight, policy)
    y = y.view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


def linear_forward(self: nn.Module, x: torch.Tensor,
                   l2_prefetch_next: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """`Linear.forward` / `MergedLinear.forward` with the module's policy (the L2 prefetch
    hint is a CUDA matter)."""
    return linear(x, self.weight, self.bias, policy_of(self))


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module,
                proj: nn.Module, l2_prefetch_next: tuple[torch.Tensor, ...] = ()
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """layers/fused_linear.py's `norm_linear` (proj(norm(x + residual)), x + residual) with
    the projection's policy. The RMSNorm reference (layers/norm.py) is already invariant
    (a per-row reduction over the hidden size, measured); the product is not."""
    policy = policy_of(proj)
    if not policy.batch_invariant:
        return fused_linear.norm_linear(x, residual, norm, proj, l2_prefetch_next)
    if residual is None:
        residual, normed = x, norm(x)
    else:
        normed, residual = norm(x, residual)
    return linear(normed, proj.weight, proj.bias, policy), residual


def silu_mul_linear(gate_up: torch.Tensor, proj: nn.Module,
                    l2_prefetch_next: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """proj(silu(gate) * up), as layers/fused_linear.py's, with the projection's policy."""
    policy = policy_of(proj)
    if not policy.batch_invariant:
        return fused_linear.silu_mul_linear(gate_up, proj, l2_prefetch_next)
    return linear(silu_and_mul(gate_up), proj.weight, proj.bias, policy)


def logits_into(hidden: torch.Tensor, lm_head_weight: torch.Tensor, out: torch.Tensor,
                policy: KernelPolicy) -> torch.Tensor:
    """The LM head into the runner's persistent logits buffer: generation (a few rows) and
    prompt scoring (slices of hundreds) must produce the same row bits."""
    if not policy.batch_invariant:
        return linear_ops.logits_into(hidden, lm_head_weight, out)
    out.copy_(invariant_matmul(hidden, lm_head_weight, policy))
    return out


def compute_logits(self: nn.Module, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A model's `compute_logits` with its policy."""
    return logits_into(hidden, self.lm_head.weight, out, policy_of(self))


# ------------------------------------------------------------------------------- attention
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
    runs an online softmax over tiles of `attention_tile` tokens, in order, from scratch;
    `merge_split` folds the splits in order. Every step is an elementwise op or a reduction
    over the innermost axis of one token's own data (D or the tile), exps go through
    `scalar_path`, and float32 throughout: no value of another token, nor the number of
    tokens, nor whether the token came in a prefill chunk or a decode step can change a bit.
    This is the CPU reference of the unified GPU kernel the doc plans (prefill, mixed and
    decode steps alike).
    """
    t, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    extent = slots.shape[1]
    tile, split = policy.attention_tile, policy.attention_split
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
    slots: torch.Tensor | None = None     # [T, E], made by `update`
    visible: torch.Tensor | None = None   # [T, E]


class InvariantAttentionBackend:
    """An attention backend (attention/backend.py's contract) whose every token's result is
    `paged_attention`'s: the CPU path of the batch-invariant mode, where attention/
    gathered.py's one SDPA call per layer is not invariant.

    `update` turns the step's persistent inputs into each token's request, position and
    slots of its logical KV positions, with device ops only; the extent is a host int fixed
    before any op: the step's own (eager) or, in a step being recorded into a graph
    (attention/gathered.py's `recording`), the most any request may hold, so replays of any
    content fit. Extra splits are masked, so both give the same bits. The policy is a class
    attribute here only because the runner constructs backends without one today; the
    design passes it to the constructor."""
    name = "batch_invariant"
    supports_cudagraph = True
    supports_batch_invariant = True
    policy = KernelPolicy(batch_invariant=True)

    def __init__(self, spec: AttentionSpec, device: torch.device,
                 buffers: PersistentInputs | None = None, compile: bool = False) -> None:
        self.spec = spec
        self.device = device

    def prepare(self, inputs: StepAttentionInputs) -> None:
        pass

    def build(self, inputs: StepAttentionInputs) -> InvariantAttentionMetadata:
        lens = inputs.seq_lens_cpu[:inputs.num_reqs]
        most = self.spec.max_blocks_per_seq * self.spec.block_size
        return InvariantAttentionMetadata(inputs, attention_extent(lens, self.policy),
                                          attention_extent([most], self.policy))

    def update(self, meta: InvariantAttentionMetadata, inputs: StepAttentionInputs) -> None:
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

    def forward(self, q: torch.Tensor, kv_cache: KVCache,
                meta: InvariantAttentionMetadata) -> torch.Tensor:
        return paged_attention(q, kv_cache[0], kv_cache[1], meta.slots, meta.visible,
                               self.spec.scale, self.policy)


# ------------------------------------------------------------------------------- sampler
def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int,
                     policy: KernelPolicy = KernelPolicy(batch_invariant=True)
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """worker/sampler.py's `compute_logprobs` (the given token's logprob and rank, then the
    top N, ties by lower id), from ATen's per-row log_softmax kernel: one thread reduces a
    row whatever the row count, where `torch.logsumexp` sums a lone long row with two.
    Generation and prompt scoring both call it, which generation == scoring needs."""
    if not policy.batch_invariant:
        from fullgraph.worker import sampler
        return sampler.compute_logprobs(logits, token_ids, num_logprobs)
    x = logits.float()
    lp = torch.log_softmax(x, dim=-1)
    tok = token_ids.long()[:, None]
    ranks = (x > x.gather(1, tok)).sum(-1) + 1
    lps, ids = [lp.gather(1, tok)], [tok]
    if num_logprobs > 0:
        order = x.sort(dim=-1, descending=True, stable=True).indices[:, :num_logprobs]
        lps.append(lp.gather(1, order))
        ids.append(order)
    return torch.cat(lps, -1), torch.cat(ids, -1), ranks


# ------------------------------------------------------------------------------- GDN
@dataclass(slots=True)
class GDNLaneState:
    """One lane's gated-delta-rule state in the mode: the recurrent state at its last
    absolute chunk boundary (position a multiple of `gdn_chunk`), and the rule's inputs
    (q, k, v, g, beta) of the tokens after it, fewer than a chunk."""
    committed: torch.Tensor                   # [HV, DK, DV] float32
    tail: tuple[torch.Tensor, ...]            # per input, [n < chunk, ...]


def aligned_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             g: torch.Tensor, beta: torch.Tensor, lane: GDNLaneState,
                             policy: KernelPolicy) -> tuple[torch.Tensor, GDNLaneState]:
    """The gated delta rule for one lane's new tokens, with the same bits however the
    sequence was cut into steps (prefill chunks of any size, decode tokens).

    The chunked form's result for a token depends on where its chunk starts, and decode's
    recurrent form differs from both (measured). Here chunks start at absolute multiples of
    `gdn_chunk`: the tail tokens since the last boundary are run again with the new ones,
    from the committed state; complete chunks commit a new state, a partial last chunk only
    gives its tokens' outputs (a row of a chunk depends on the rows before it only, and the
    absent later rows enter its sums as exact zeros). Inputs as
    layers/gdn/reference.py's for one lane; returns (outputs of the new tokens, new lane
    state)."""
    from fullgraph.layers.gdn.reference import chunk_gated_delta_rule_ref
    chunk = policy.gdn_chunk
    seq = [torch.cat([old, new]) for old, new in zip(lane.tail, (q, k, v, g, beta))]
    n_tail, total = lane.tail[0].shape[0], seq[0].shape[0]
    full = total // chunk * chunk
    one = torch.ones(1, dtype=torch.bool, device=q.device)
    slot = torch.ones(1, dtype=torch.long, device=q.device)

    def run(lo: int, hi: int, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = torch.stack([torch.zeros_like(state), state])
        qsl = torch.tensor([0, hi - lo], device=q.device)
        out = chunk_gated_delta_rule_ref(*(x[lo:hi] for x in seq), pool, slot, qsl, one,
                                         chunk_size=chunk)
        return out, pool[1]

    outs, committed = [], lane.committed
    if full:
        out, committed = run(0, full, committed)
        outs.append(out)
    if total > full:
        out, _ = run(full, total, committed)            # a partial chunk commits nothing
        outs.append(out)
    return (torch.cat(outs)[n_tail:],
            GDNLaneState(committed, tuple(x[full:] for x in seq)))


def empty_lane(num_v_heads: int, head_k_dim: int, head_v_dim: int, num_k_heads: int,
               dtype: torch.dtype = torch.float32, device=None) -> GDNLaneState:
    """A lane before its first token: a zero state and no tail (g and the state float32, as
    layers/gdn/gating.py and state.py keep them)."""
    def zeros(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dt, device=device)
    return GDNLaneState(zeros(num_v_heads, head_k_dim, head_v_dim, dt=torch.float32),
                        (zeros(0, num_k_heads, head_k_dim), zeros(0, num_k_heads, head_k_dim),
                         zeros(0, num_v_heads, head_v_dim),
                         zeros(0, num_v_heads, dt=torch.float32), zeros(0, num_v_heads)))
