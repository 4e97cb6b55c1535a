"""Sampling with no host synchronization: the spec (plain torch, the CPU path) and dispatch.

One step's sampler costs what its rows ask for. The runner computes a `SamplerFeatures` key on
the host from the rows' parameters (no device read) and runs the variant for it: greedy-only
is the model graph's argmax; the others are `sample()` with only those features switched on,
and every variant gives a row the same result as the general one (a feature a row does not
use is a no-op for it, bit for bit), so a runner may round a key up to a variant it captured.

The math, in the order vLLM applies it (v1 sampler; `apply_penalties` in
vllm/model_executor/layers/utils.py):

1. logprobs (when asked): of the raw logits, before any processing (vLLM's "raw_logprobs").
2. processing, in float32, for rows with a state slot (`SamplingState`): banned tokens
   (allowed_token_ids' complement, single-token bad words) -> -inf; logit_bias added;
   repetition penalty (tokens in the prompt or the output: positive logits divided by it,
   negative ones multiplied); frequency penalty (minus penalty x output count) and presence
   penalty (minus penalty if in the output).
3. greedy rows (temperature < 1e-5): the first index of the maximum of the processed logits.
4. sampled rows: s = logits / temperature; min_p keeps s >= max(s) + log(min_p); top-k keeps
   the values >= the k-th largest survivor; top-p, over the top-k renormalized distribution,
   keeps the values whose probability mass strictly above them is < top_p (so the most
   likely token always stays). Ties are kept or dropped together: the kept set is always
   {s >= threshold}. vLLM's sort-based code keeps an arbitrary part of a tie group at the
   boundary; this is the tie-closed version of the same rule.
5. the token: argmax over the kept set of s + Gumbel noise (Gumbel-max: an exact draw from
   the renormalized softmax of the kept logits, with no sort and no cumulative sum).

Draws use no shared random stream: the Gumbel noise is a counter-based hash of (request
seed, position of the sampled token, vocabulary id), so a row's token depends only on its
own seed, position and logits, never on its batch neighbours or the batch size, and a
recomputed (preempted) request draws the same token again. `uniform_noise` is the integer
hash and its float mapping; the Triton kernels (layers/sampling.py) compute the same 32-bit
integers bit for bit, so CPU and GPU draw the same token wherever float rounding of the
logs does not separate two candidates.

On CUDA (with Triton) the kernels in layers/sampling.py do the work: one fused pass reads
each logits row once, computes the noise in registers and reduces to the argmax (blocks that
cannot hold the winner skip the noise); top-k/top-p/min_p find the row's threshold with a
few passes (no sort of the vocabulary); logprobs only for rows that asked. Elsewhere this
module's torch code runs, over rows in chunks of `SAMPLE_CHUNK_ROWS` (a bounded [rows x
vocab] workspace).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from fullgraph.layers.argmax import argmax_rows

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B          # < 2**31, so products of 32-bit values stay inside int64
_GOLDEN = 0x9E3779B1
NOISE_BITS = 23           # uniform draws are (j + 0.5) / 2**23, j a 23-bit integer
# The largest Gumbel noise the mapping can produce (j = 0): -log(-log(1 - 2**-24)) = 16.636;
# kernels skip logits blocks whose maximum plus this cannot reach the best key so far.
GUMBEL_MAX = 16.7
GREEDY_EPS = 1e-5         # temperatures below this are greedy (vLLM's _SAMPLING_EPS)
SAMPLE_CHUNK_ROWS = 16    # the torch path's rows per chunk: bounds its [rows, vocab] workspace
MAX_LOGIT_BIAS = 1024     # logit_bias entries per request (vLLM's limit too)
MAX_STOP_IDS = 128        # eos + stop_token_ids banned under min_tokens (vLLM's limit too)


# ---------------------------------------------------------------------------------- noise
def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[R] int64 holding 32-bit values: the hash of (seed, position) every draw of a row
    starts from."""
    seeds = seeds.to(torch.int64)
    positions = positions.to(torch.int64)
    return _mix32((seeds & _M32) ^ _mix32(((seeds >> 32) & _M32) ^ _mix32(positions & _M32)))


def noise_bits(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, V] int64: the 32-bit hash of (seed, position, vocab id). The kernels compute these
    integers exactly (tests/test_gpu_sampling.py)."""
    h = row_keys(seeds, positions)
    v = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    return _mix32((h[:, None] + v[None, :] * _GOLDEN) & _M32)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, V] float32 in (0, 1), never 0 or 1: (j + 0.5) / 2**23 with j the hash's top 23
    bits (exact in float32)."""
    j = noise_bits(seeds, positions, vocab_size) >> (32 - NOISE_BITS)
    return (j.float() + 0.5) * (1.0 / (1 << NOISE_BITS))


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, V] float32 standard Gumbel noise -log(-log(1 - u)). 1 - u is exact, so the large
    values (u -> 0, the ones that win an argmax) keep their accuracy."""
    u = uniform_noise(seeds, positions, vocab_size)
    return -torch.log(-torch.log(1.0 - u))


# ---------------------------------------------------------------------------------- inputs
@dataclass(frozen=True, slots=True)
class SamplerFeatures:
    """What a step's sampler must do, from its rows' parameters, known on the host. Part of
    the sampler graph key: each variant gives a row the same result as the general one.

    sample: a row draws (temperature >= 1e-5). filter: a drawing row has top_k, top_p or
    min_p. process: a row has a state slot (penalties, logit_bias, allowed_token_ids or
    bad words; greedy rows too, since they change the argmax). logprobs: a row asked for
    logprobs (the width is the graph's `num_logprobs`, the engine's max_logprobs)."""
    sample: bool = False
    filter: bool = False
    process: bool = False
    logprobs: bool = False

    @property
    def greedy_only(self) -> bool:
        """The model graph's argmax is the whole sampler."""
        return not (self.sample or self.filter or self.process or self.logprobs)

    def covers(self, other: "SamplerFeatures") -> bool:
        return all(getattr(self, f) or not getattr(other, f) for f in _FEATURE_FIELDS)

    def __or__(self, other: "SamplerFeatures") -> "SamplerFeatures":
        return SamplerFeatures(*(getattr(self, f) or getattr(other, f)
                                 for f in _FEATURE_FIELDS))

    @classmethod
    def of_params(cls, params) -> "SamplerFeatures":
        """One request's features from its SamplingParams (fields vLLM names; ones this
        engine's SamplingParams does not have yet count as off)."""
        draws = params.temperature >= GREEDY_EPS
        top_k = getattr(params, "top_k", -1) or -1
        filt = draws and (top_k > 0 or getattr(params, "top_p", 1.0) < 1.0
                          or getattr(params, "min_p", 0.0) > 0.0)
        return cls(sample=draws, filter=filt, process=needs_state(params),
                   logprobs=getattr(params, "logprobs", None) is not None)

    @classmethod
    def of_batch(cls, params: Iterable) -> "SamplerFeatures":
        out = GREEDY
        for p in params:
            out = out | cls.of_params(p)
        return out


_FEATURE_FIELDS = ("sample", "filter", "process", "logprobs")
GREEDY = SamplerFeatures()
ALL_FEATURES = SamplerFeatures(True, True, True, True)


def needs_state(params) -> bool:
    """Whether a request needs a sampling state slot (what `SamplingState` holds)."""
    return bool(penalized(params)
                or getattr(params, "logit_bias", None)
                or getattr(params, "allowed_token_ids", None)
                or getattr(params, "min_tokens", 0)
                or getattr(params, "bad_words_token_ids", None))


def penalized(params) -> bool:
    """Whether a request has repetition, frequency or presence penalties."""
    return bool(getattr(params, "repetition_penalty", 1.0) != 1.0
                or getattr(params, "frequency_penalty", 0.0) != 0.0
                or getattr(params, "presence_penalty", 0.0) != 0.0)


def multi_token_bad_words(params) -> list[list[int]]:
    """Bad words longer than one token: their last token is banned only right after the
    rest of the word was generated (vLLM's rule), which the runner checks each step."""
    return [w for w in getattr(params, "bad_words_token_ids", None) or [] if len(w) > 1]


def word_bans(params, output_token_ids: Sequence[int]) -> frozenset[int]:
    """The last token of each multi-token bad word whose other tokens end the output so far:
    what the request may not generate next, beyond its fixed bans."""
    bans = set()
    for word in multi_token_bad_words(params):
        k = len(word) - 1
        if len(output_token_ids) >= k and list(output_token_ids[-k:]) == word[:-1]:
            bans.add(word[-1])
    return frozenset(bans)


def _single_token_bad_words(params) -> list[int]:
    """Token ids of bad words that are one token long (`bad_words_token_ids`, a list of
    token-id lists, as the engine tokenizes `bad_words`)."""
    words = getattr(params, "bad_words_token_ids", None) or []
    return [w[0] for w in words if len(w) == 1]


@dataclass(slots=True)
class SamplingTensors:
    """Per-row sampling inputs ([R] device tensors, views of persistent buffers) and the
    host-known batch flags."""
    temperature: torch.Tensor      # [R] float32, < 1e-5 = greedy
    top_k: torch.Tensor            # [R] int32, <= 0 or >= vocab size = off
    top_p: torch.Tensor            # [R] float32, 1 = off
    seeds: torch.Tensor            # [R] int64
    positions: torch.Tensor        # [R] int32/int64, position of the token being sampled
    all_greedy: bool
    any_top_k_top_p: bool          # any top-k, top-p or min_p (a `filter` step)
    num_logprobs: int              # top-N width of the logprobs output; -1 = none
    min_p: torch.Tensor | None = None          # [R] float32, 0 = off; None: all off
    # [R] int32 index into SamplingState, -1 = none (also for rows whose sample is thrown
    # away, a prefill chunk short of the prompt's end: no penalties, no count update)
    state_slots: torch.Tensor | None = None
    # [R] int32 logprobs each row asked for, -1 = none: rows at -1 skip the logprob work on
    # the GPU (their logprob outputs are then unspecified). None: every row.
    row_logprobs: torch.Tensor | None = None

    @property
    def greedy_only(self) -> bool:
        """Argmax is all this step needs (the model graph's own output)."""
        return self.all_greedy and self.num_logprobs < 0 and self.state_slots is None

    @property
    def features(self) -> SamplerFeatures:
        return SamplerFeatures(sample=not self.all_greedy,
                               filter=not self.all_greedy and self.any_top_k_top_p,
                               process=self.state_slots is not None,
                               logprobs=self.num_logprobs >= 0)

    def rows(self, lo: int, hi: int) -> "SamplingTensors":
        cut = {f: getattr(self, f)[lo:hi] for f in _ROW_FIELDS if getattr(self, f) is not None}
        return dataclasses.replace(self, **cut)


_ROW_FIELDS = ("temperature", "top_k", "top_p", "seeds", "positions", "min_p", "state_slots",
               "row_logprobs")


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor                  # [R] int64
    logprobs: torch.Tensor | None = None     # [R, 1 + N]: sampled token's, then top-N
    logprob_token_ids: torch.Tensor | None = None
    ranks: torch.Tensor | None = None        # [R] rank of the sampled token (1 = most likely)


# ---------------------------------------------------------------------------------- state
@dataclass(slots=True)
class SamplingState:
    """Per-request state that outlives a step, in persistent device buffers indexed by a
    state slot (one per admitted request that needs one, `needs_state`). Row `num_slots`
    is scratch: slot -1 reads and writes there, so kernels never branch on it.

    Reset a slot when a request is admitted (and re-admitted after preemption) with
    `reset_slot`, eagerly, before the request's first step; `update_counts` (inside the
    sampler, `sample(..., state=)`) adds each step's sampled token to its row's counts."""
    output_counts: torch.Tensor    # [S + 1, V] int32: times each token was generated
    prompt_mask: torch.Tensor      # [S + 1, W] int32 bitmask (W = ceil(V / 32)): in the prompt
    banned_mask: torch.Tensor      # [S + 1, W] int32 bitmask: banned tokens (-inf)
    repetition_penalty: torch.Tensor   # [S + 1] float32, 1 = off
    frequency_penalty: torch.Tensor    # [S + 1] float32, 0 = off
    presence_penalty: torch.Tensor     # [S + 1] float32, 0 = off
    flags: torch.Tensor            # [S + 1] int32: FLAG_* bits of what the slot uses
    bias_ids: torch.Tensor         # [S + 1, B] int32 logit_bias token ids, -1 = unused
    bias_values: torch.Tensor      # [S + 1, B] float32
    # min_tokens: stop_ids are banned while the sampled token's position < min_len
    # (prompt length + min_tokens)
    min_len: torch.Tensor          # [S + 1] int32
    stop_ids: torch.Tensor         # [S + 1, MAX_STOP_IDS] int32 eos + stop_token_ids, -1 = unused
    # host copies of the fixed bans of slots whose bans also change per step (`set_step_bans`)
    fixed_bans: dict[int, frozenset[int]] = field(default_factory=dict)

    @property
    def num_slots(self) -> int:
        return self.output_counts.shape[0] - 1

    @property
    def vocab_size(self) -> int:
        return self.output_counts.shape[1]

    @classmethod
    def allocate(cls, num_slots: int, vocab_size: int, device, max_logit_bias: int = MAX_LOGIT_BIAS
                 ) -> "SamplingState":
        s, w = num_slots + 1, (vocab_size + 31) // 32

        def z(*shape, dtype=torch.int32):
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(z(s, vocab_size), z(s, w), z(s, w), torch.ones(s, device=device),
                   z(s, dtype=torch.float32), z(s, dtype=torch.float32), z(s),
                   torch.full((s, max_logit_bias), -1, dtype=torch.int32, device=device),
                   z(s, max_logit_bias, dtype=torch.float32), z(s),
                   torch.full((s, MAX_STOP_IDS), -1, dtype=torch.int32, device=device))

    def reset_slot(self, slot: int, *, prompt_token_ids: Sequence[int] = (),
                   output_token_ids: Sequence[int] = (), repetition_penalty: float = 1.0,
                   frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                   logit_bias: dict[int, float] | None = None,
                   allowed_token_ids: Sequence[int] | None = None,
                   bad_token_ids: Sequence[int] = (), min_tokens: int = 0,
                   stop_token_ids: Sequence[int] = (), step_bans: bool = False) -> None:
        """Eager (not in a graph), on the current stream, at admission: the request's
        parameters, its prompt's presence bits and the counts of the tokens it already
        generated (non-empty after a preemption). `stop_token_ids`: eos (unless ignored) and
        the request's stop tokens, banned until `min_tokens` tokens were generated.
        `step_bans`: the banned tokens change from step to step (`set_banned`)."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"state slot {slot} out of range [0, {self.num_slots})")
        v = self.vocab_size
        for name, ids in (("prompt", prompt_token_ids), ("output", output_token_ids),
                          ("allowed", allowed_token_ids or ()), ("bad word", bad_token_ids),
                          ("logit_bias", list(logit_bias or ())), ("stop", stop_token_ids)):
            if any(not 0 <= int(t) < v for t in ids):
                raise ValueError(f"{name} token id out of range [0, {v})")
        bias = dict(logit_bias or {})
        if len(bias) > self.bias_ids.shape[1]:
            raise ValueError(f"at most {self.bias_ids.shape[1]} logit_bias entries, "
                             f"got {len(bias)}")
        stops = sorted(set(int(t) for t in stop_token_ids)) if min_tokens > 0 else []
        if len(stops) > self.stop_ids.shape[1]:
            raise ValueError(f"at most {self.stop_ids.shape[1]} stop token ids with min_tokens")
        counts = torch.bincount(torch.as_tensor(list(output_token_ids), dtype=torch.int64),
                                minlength=v)
        _upload(self.output_counts[slot], counts.to(torch.int32))
        _upload(self.prompt_mask[slot], _pack_bits(prompt_token_ids, v))
        banned = set(int(t) for t in bad_token_ids)
        if allowed_token_ids:
            banned |= set(range(v)) - set(int(t) for t in allowed_token_ids)
        _upload(self.banned_mask[slot], _pack_bits(banned, v))
        if step_bans:
            self.fixed_bans[slot] = frozenset(banned)
        else:
            self.fixed_bans.pop(slot, None)
        ids = torch.full((self.bias_ids.shape[1],), -1, dtype=torch.int32)
        vals = torch.zeros(self.bias_ids.shape[1], dtype=torch.float32)
        ids[:len(bias)] = torch.tensor([int(t) for t in bias], dtype=torch.int32)
        vals[:len(bias)] = torch.tensor([float(b) for b in bias.values()], dtype=torch.float32)
        _upload(self.bias_ids[slot], ids)
        _upload(self.bias_values[slot], vals)
        sids = torch.full((self.stop_ids.shape[1],), -1, dtype=torch.int32)
        sids[:len(stops)] = torch.tensor(stops, dtype=torch.int32)
        _upload(self.stop_ids[slot], sids)
        self.min_len[slot] = len(prompt_token_ids) + min_tokens if stops else 0
        self.repetition_penalty[slot] = repetition_penalty     # scalar fills: no copy
        self.frequency_penalty[slot] = frequency_penalty
        self.presence_penalty[slot] = presence_penalty
        flags = ((FLAG_PENALTY if (repetition_penalty != 1.0 or frequency_penalty != 0.0
                                   or presence_penalty != 0.0) else 0)
                 | (FLAG_BANNED if banned or step_bans else 0) | (FLAG_BIAS if bias else 0)
                 | (FLAG_MIN_TOKENS if stops else 0))
        self.flags[slot] = flags

    def reset_slot_from_params(self, slot: int, params, prompt_token_ids: Sequence[int],
                               output_token_ids: Sequence[int] = (),
                               eos_token_ids: Sequence[int] = ()) -> None:
        """`reset_slot` with a request's SamplingParams (vLLM's field names)."""
        stops = list(getattr(params, "stop_token_ids", None) or ())
        if not getattr(params, "ignore_eos", False):
            stops += list(eos_token_ids)
        self.reset_slot(
            slot, prompt_token_ids=prompt_token_ids, output_token_ids=output_token_ids,
            repetition_penalty=getattr(params, "repetition_penalty", 1.0),
            frequency_penalty=getattr(params, "frequency_penalty", 0.0),
            presence_penalty=getattr(params, "presence_penalty", 0.0),
            logit_bias=getattr(params, "logit_bias", None),
            allowed_token_ids=getattr(params, "allowed_token_ids", None),
            bad_token_ids=_single_token_bad_words(params),
            min_tokens=getattr(params, "min_tokens", 0) or 0, stop_token_ids=stops,
            step_bans=bool(multi_token_bad_words(params)))

    def set_step_bans(self, slot: int, token_ids: Iterable[int]) -> None:
        """A slot's banned tokens for the next step: its fixed ones and `token_ids` (eager,
        before the step), for a request whose bans depend on the tokens it generated
        (multi-token bad words; the slot was reset with `step_bans`)."""
        _upload(self.banned_mask[slot],
                _pack_bits(self.fixed_bans[slot] | set(token_ids), self.vocab_size))


FLAG_PENALTY, FLAG_BANNED, FLAG_BIAS, FLAG_MIN_TOKENS = 1, 2, 4, 8


def _upload(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Host -> device without waiting: from pinned memory, asynchronously on the current
    stream (a pageable copy would wait for the step in flight under async scheduling)."""
    if dst.is_cuda:
        dst.copy_(src.pin_memory(), non_blocking=True)
    else:
        dst.copy_(src)


def _pack_bits(token_ids: Iterable[int], vocab_size: int) -> torch.Tensor:
    """[ceil(V / 32)] int32 bitmask: bit t % 32 of word t // 32 set for each id."""
    words = torch.zeros((vocab_size + 31) // 32, dtype=torch.int64)
    ids = torch.as_tensor(sorted(set(int(t) for t in token_ids)), dtype=torch.int64)
    if ids.numel():
        words.index_add_(0, ids // 32, torch.ones_like(ids) << (ids % 32))
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_bits(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[..., W] int32 bitmask -> [..., V] bool."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    bits = (words[..., None] >> shifts) & 1
    return bits.reshape(*words.shape[:-1], -1)[..., :vocab_size].bool()


# ---------------------------------------------------------------------------------- reference
def process_logits(logits: torch.Tensor, state: SamplingState, slots: torch.Tensor,
                   positions: torch.Tensor, extra_counts: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """[R, V] float32: banned tokens, logit_bias, min_tokens' stop-token ban and penalties
    applied (vLLM's order and formulas) for rows with a slot; the others are the logits in
    float32. `positions`: of the token being sampled. `extra_counts` [R, V]: output tokens a
    row counts beyond its slot's (a verified row: the drafts before it)."""
    z = logits.float().clone()
    v = z.shape[1]
    slot = torch.where(slots >= 0, slots.long(), state.num_slots)
    has = (slots >= 0)[:, None]
    flags = state.flags[slot][:, None]
    banned = unpack_bits(state.banned_mask[slot], v) & has & ((flags & FLAG_BANNED) != 0)
    z = z.masked_fill(banned, float("-inf"))
    ids, vals = state.bias_ids[slot].long(), state.bias_values[slot]
    use = (ids >= 0) & has & ((flags & FLAG_BIAS) != 0)
    # unused entries add +0.0 to column 0 (no data-dependent shapes: graph-safe)
    z.scatter_add_(1, torch.where(use, ids, 0), torch.where(use, vals, 0.0))
    sids = state.stop_ids[slot].long()
    early = has & ((flags & FLAG_MIN_TOKENS) != 0) \
        & (positions.long() < state.min_len[slot].long())[:, None]
    stop = torch.zeros(z.shape, dtype=torch.int32, device=z.device).scatter_add_(
        1, sids.clamp(min=0), ((sids >= 0) & early).to(torch.int32))
    z = z.masked_fill(stop > 0, float("-inf"))
    counts = state.output_counts[slot]
    if extra_counts is not None:
        counts = counts + extra_counts
    out_mask = counts > 0
    seen = (unpack_bits(state.prompt_mask[slot], v) | out_mask) & has
    rep = state.repetition_penalty[slot][:, None]
    z = torch.where(seen, torch.where(z > 0, z / rep, z * rep), z)
    z = z - state.frequency_penalty[slot][:, None] * counts.float() * has
    z = z - state.presence_penalty[slot][:, None] * out_mask.float() * has
    return z


def update_counts(state: SamplingState, slots: torch.Tensor, token_ids: torch.Tensor) -> None:
    """output_counts[slot, token] += 1 for each row with a slot (slot -1: nothing)."""
    slot = torch.where(slots >= 0, slots.long(), state.num_slots)
    flat = state.output_counts.view(-1)
    flat.index_put_((slot * state.vocab_size + token_ids.long(),),
                    (slots >= 0).to(torch.int32), accumulate=True)


def scale(z: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """s = z / T for drawing rows (greedy rows unchanged: they never read it)."""
    draws = temperature >= GREEDY_EPS
    return torch.where(draws[:, None], z / torch.where(draws, temperature, 1.0)[:, None], z)


def filter_thresholds(s: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                      min_p: torch.Tensor | None) -> torch.Tensor:
    """[R] float32 threshold per row of scaled logits `s`: the kept set is {s >= threshold}
    (-inf: every finite value). The spec of min_p, top-k and top-p (module docstring); a
    sort is fine here, the kernels search the same threshold without one."""
    r, v = s.shape
    finite = s > float("-inf")                                     # NaN: never kept
    m = torch.where(finite, s, float("-inf")).amax(-1)
    if min_p is None:
        min_p = torch.zeros_like(top_p)
    cutoff = torch.where(min_p > 0, m + torch.log(min_p.clamp(min=1e-30)),
                         torch.full_like(m, float("-inf")))
    surv = finite & (s >= cutoff[:, None])
    n = surv.sum(-1)
    k = top_k.long()
    k_on = (k > 0) & (k < n)
    p_on = top_p < 1.0
    sv = torch.where(surv, s, float("-inf")).sort(-1, descending=True).values
    e = torch.where(sv > float("-inf"), torch.exp(sv - m[:, None]), 0.0)
    i = torch.arange(v, device=s.device)[None, :]
    vk = sv.gather(1, (k - 1).clamp(0, v - 1)[:, None])            # the k-th largest value
    z = torch.where(k_on, torch.where(sv >= vk, e, 0.0).sum(-1), e.sum(-1))
    above = torch.cumsum(e, -1) - e                                # mass strictly above
    q = (i < n[:, None]) & (~k_on[:, None] | (i < k[:, None])) \
        & (~p_on[:, None] | (above < (top_p * z)[:, None]))
    t0 = torch.where(q, sv, float("inf")).amin(-1)
    return torch.where(k_on | p_on, t0, cutoff)


def sample_reference(z: torch.Tensor, t: SamplingTensors,
                     features: SamplerFeatures) -> torch.Tensor:
    """[r] int64 tokens of processed float32 logits `z` (the spec the kernels follow)."""
    greedy = z.argmax(-1)
    if not features.sample:
        return greedy
    s = scale(z, t.temperature)
    if features.filter:
        thr = filter_thresholds(s, t.top_k, t.top_p, t.min_p)
        s = torch.where(s >= thr[:, None], s, float("-inf"))
    key = s + gumbel_noise(t.seeds, t.positions, z.shape[1])
    return torch.where(t.temperature >= GREEDY_EPS, key.argmax(-1), greedy)


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of raw logits [R, V]: ([R, 1 + N] logprobs, [R, 1 + N] ids, [R] ranks): the given
    token's logprob and rank (1 + how many tokens are strictly more likely), then the top
    N (ties: lower id first).

    From ATen's per-row log_softmax: one thread reduces a row whatever the row count, where
    `torch.logsumexp` sums a lone long row with two threads and a row among others with one
    (docs/batch_invariance.md, section 3), so a row's logprobs do not depend on the batch:
    the sampler and prompt scoring (`prompt_logprobs`) give the same bits for the same
    logits."""
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


def prompt_logprobs(logits: torch.Tensor, next_token_ids: torch.Tensor, num_logprobs: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logprobs of a prompt: `logits` [P, V] at prompt positions 0..P-1, `next_token_ids` [P]
    the prompt tokens at positions 1..P. Same outputs as `compute_logprobs` (row i: the
    logprob of prompt token i + 1); the engine shapes them as vLLM does (`logprob_entry`)."""
    if logits.is_cuda:
        from fullgraph.layers import sampling as kernels
        if kernels.available():
            return kernels.logprobs(logits, next_token_ids, num_logprobs, None)
    return compute_logprobs(logits, next_token_ids, num_logprobs)


# ---------------------------------------------------------------------------------- entry
def sample(logits: torch.Tensor, t: SamplingTensors, features: SamplerFeatures | None = None,
           state: SamplingState | None = None) -> SamplerOutput:
    """logits: [R, V] raw, in the model's dtype. `features` (default: from `t`'s flags) picks
    the variant; `state` is needed when it has `process` (then each row's sampled token is
    also added to its slot's output counts)."""
    if features is None:
        features = t.features
    if features.process and (state is None or t.state_slots is None):
        raise ValueError("a processing step needs a SamplingState and per-row state_slots")
    if features.greedy_only:
        return SamplerOutput(argmax_rows(logits))
    if logits.is_cuda:
        from fullgraph.layers import sampling as kernels
        if kernels.available():
            tokens, lp = kernels.sample(logits, t, features, state)
            return SamplerOutput(tokens, *(lp or ()))
    n = logits.shape[0]
    parts = [_sample_rows(logits[lo:lo + SAMPLE_CHUNK_ROWS], t.rows(lo, lo + SAMPLE_CHUNK_ROWS),
                          features, state) for lo in range(0, n, SAMPLE_CHUNK_ROWS)]
    fields = [f.name for f in dataclasses.fields(SamplerOutput)]
    out = SamplerOutput(**{f: None if getattr(parts[0], f) is None
                           else torch.cat([getattr(p, f) for p in parts]) for f in fields})
    if features.process:
        update_counts(state, t.state_slots, out.token_ids)
    return out


def _sample_rows(logits: torch.Tensor, t: SamplingTensors, features: SamplerFeatures,
                 state: SamplingState | None) -> SamplerOutput:
    if features.process:
        z = process_logits(logits, state, t.state_slots, t.positions)
    else:
        z = logits.float()
    out = SamplerOutput(sample_reference(z, t, features))
    if features.logprobs and t.num_logprobs >= 0:
        out.logprobs, out.logprob_token_ids, out.ranks = compute_logprobs(
            logits, out.token_ids, t.num_logprobs)
    return out
