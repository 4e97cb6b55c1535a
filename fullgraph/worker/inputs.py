"""The model runner's persistent step inputs and how one step's values are written into them.

Everything is staged in pinned host buffers through numpy views (no per-step tensor
allocation) and reaches the persistent device buffers in two transfers: one arena holding
every 1-D input (a kernel moves the step's padded extent of each, buffers.py; a graph step
makes that launch inside its graph, model_runner.py), and the block-table rows up to the
step's padded size. Padding lanes get harmless values: token 0
at position 0, slot 0 of the null block, a zero block-table row, sequence length 0. Host
time is the budget here (tens of µs a step): device views are sliced once per padded shape,
block-table rows and sampling rows are rewritten only when they change, and a pure-decode
step skips the general path's repeats and cumsums.
"""
from __future__ import annotations

import dataclasses
from array import array
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import torch

from fullgraph.attention.metadata import PersistentInputs, StepAttentionInputs
from fullgraph.buffers import CpuGpuBuffer, IndexedWrite, StagingArena
from fullgraph.config import CUDAGraphMode
from fullgraph.sampling_params import SamplingParams
from fullgraph.worker.cudagraph.descriptor import BatchExecutionDescriptor
from fullgraph.worker.sampler import GREEDY, SamplerFeatures, SamplingTensors


class RequestState(Protocol):
    """What the runner reads of a request (the engine's `Request` satisfies it)."""
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_preemptions: int
    prompt_logprobs: list | None     # entries so far ([None] first), if asked for
    all_token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]
    state_slot: int                  # linear-attention state slot (0: the null slot)
    sampling_slot: int               # the sampler's state slot (penalties ...; -1: none)
    sampling_params: SamplingParams
    seed: int
    # read by speculative steps only (worker/spec_decode/verify.py)
    max_tokens: int
    num_output_tokens: int


class ScheduledChunk(Protocol):
    request: RequestState
    num_new_tokens: int
    samples: bool                    # the chunk reaches the last known token: a token is drawn
    spec_token_ids: Sequence[int]    # drafts the chunk ends with (speculative decoding)


_GREEDY = SamplingParams(temperature=0.0)


@dataclass(slots=True, eq=False)
class StandInRequest:
    """A `RequestState` the runner makes itself: the dummy requests of warmup and capture,
    and the drafter's views of a speculative step's requests (worker/spec_decode/)."""
    all_token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]
    state_slot: int = 0
    sampling_slot: int = -1
    sampling_params: SamplingParams = field(default_factory=lambda: _GREEDY)
    seed: int = 0
    prompt_logprobs: None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0


@dataclass(slots=True)
class StandInChunk:
    request: StandInRequest
    num_new_tokens: int
    samples: bool = True
    spec_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class _StepViews:
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    logits_indices: torch.Tensor
    pending_index: torch.Tensor
    pending_row: torch.Tensor
    block_table: torch.Tensor
    block_table_cpu: torch.Tensor
    state_slots: torch.Tensor
    sampling: SamplingTensors


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
    features: SamplerFeatures        # what this step's sampler must do (host-known)
    # Tokens sampled by the step still in flight (async scheduling): input_ids[pending_index]
    # = sampled[pending_row] on the device; unused rows point at the scratch slot.
    pending_index: torch.Tensor      # [num_reqs_padded]
    pending_row: torch.Tensor        # [num_reqs_padded] row of the request in the previous step


def _words(a: np.ndarray) -> memoryview:
    """A writable flat memoryview of a contiguous int64 ("q") or int32 ("i") array."""
    return memoryview(a).cast("B").cast({8: "q", 4: "i"}[a.itemsize])


@dataclass(slots=True)
class _SteadyDecode:
    """The last pure-decode step, for `InputBuffers._advance_decode`."""
    reqs: list[RequestState]
    desc: BatchExecutionDescriptor
    step: StepInputs
    next_done: list[int]             # each request's computed tokens one step later
    slots: list[int]                 # each row's slot this step
    # staged pending-token rows: every row's token from the previous step (True), none
    # (False), or some (None: what the general path wrote)
    pending_from_previous: bool | None


class InputBuffers:
    def __init__(self, max_num_seqs: int, max_num_tokens: int, max_blocks_per_seq: int,
                 block_size: int, vocab_size: int, device: torch.device,
                 moving_state_slots: bool = False) -> None:
        pin = device.type == "cuda"
        t, r = max_num_tokens, max_num_seqs

        def buf(shape, dtype):
            return CpuGpuBuffer(shape, dtype, device, pin)

        self.block_size = block_size
        self.vocab_size = vocab_size
        # Everything but the block table travels in one copy per step.
        # input_ids has one spare slot at the end: the target of unused pending-token writes.
        self.scratch_index = t
        # Each step's sampled tokens; the next step's input tokens that the host does not know
        # yet come from here (async scheduling), so the device never waits for the host.
        self.sampled = torch.zeros(r, dtype=torch.int64, device=device)
        # A step copies only its padded tokens' and requests' elements of each field, and
        # the same kernel fills the pending input tokens from `sampled` (`arena.merges`).
        tok, req = (1, 0, 0), (0, 1, 0)
        self.arena = StagingArena({
            "input_ids": (t + 1, torch.int64, tok), "positions": (t, torch.int64, tok),
            "slot_mapping": (t, torch.int64, tok),
            "query_start_loc": (r + 1, torch.int32, (0, 1, 1)),
            "seq_lens": (r, torch.int32, req), "logits_indices": (r, torch.int64, req),
            "temperature": (r, torch.float32, req), "top_k": (r, torch.int32, req),
            "top_p": (r, torch.float32, req), "seeds": (r, torch.int64, req),
            "pending_index": (r, torch.int64, req), "pending_row": (r, torch.int64, req),
            "state_slots": (r, torch.int64, req), "min_p": (r, torch.float32, req),
            "sampling_slots": (r, torch.int32, req), "row_logprobs": (r, torch.int32, req)},
            device, pin, merge=IndexedWrite("input_ids", "pending_index", "pending_row",
                                            self.sampled))
        self.block_table = buf((r + 1, max_blocks_per_seq), torch.int32)  # + a zero row
        # What each block-table row holds, so a step rewrites only rows that changed: in
        # steady decoding a row gains one block every block_size steps.
        self._row_blocks: list[list[int] | None] = [None] * (r + 1)
        self._row_len = [0] * (r + 1)
        # The steady-decode path writes through memoryviews (see `_advance_decode`).
        self._staged = tuple(_words(self.arena.np[name])
                             for name in ("input_ids", "positions", "slot_mapping", "seq_lens"))
        self._block_table_words = _words(self.block_table.np.reshape(-1))
        # A request's state slot changes from step to step under speculative decoding (the
        # slot of its group that holds the kept rows' states, layers/gdn/state.py): the
        # steady paths rewrite them then.
        self._moving_state_slots = (_words(self.arena.np["state_slots"])
                                    if moving_state_slots else None)
        self._arange = np.arange(max(t, r) + 1, dtype=np.int64)
        self._view_cache: dict[tuple[int, int], _StepViews] = {}
        self._sampling_reqs: list[RequestState] | None = None
        # the rows' sampler features, and their widest logprobs ask (-1: none)
        self._sampling_flags: tuple[SamplerFeatures, int] = (GREEDY, -1)
        self._last_decode: _SteadyDecode | None = None
        self._last_verify: StepInputs | None = None
        self._last_verify_reqs: list[RequestState] = []

    @property
    def input_ids(self) -> torch.Tensor:
        """The whole persistent input-id buffer, scratch slot included."""
        return self.arena.dev["input_ids"]

    def persistent(self) -> PersistentInputs:
        return PersistentInputs(self.block_table.gpu, self.arena.dev["positions"])

    def sampling_tensors(self, num_reqs: int, all_greedy: bool, any_top_k_top_p: bool,
                         num_logprobs: int) -> SamplingTensors:
        """The persistent sampling inputs of the first `num_reqs` rows."""
        dev = self.arena.dev
        return SamplingTensors(
            temperature=dev["temperature"][:num_reqs], top_k=dev["top_k"][:num_reqs],
            top_p=dev["top_p"][:num_reqs], seeds=dev["seeds"][:num_reqs],
            positions=dev["seq_lens"][:num_reqs],    # the sampled token's position
            all_greedy=all_greedy,
            any_top_k_top_p=any_top_k_top_p, num_logprobs=num_logprobs,
            min_p=dev["min_p"][:num_reqs], state_slots=dev["sampling_slots"][:num_reqs],
            row_logprobs=dev["row_logprobs"][:num_reqs])

    def _write_block_rows(self, reqs: list[RequestState], r_pad: int) -> None:
        bt, row_len = self.block_table.np, self._row_len
        for i, req in enumerate(reqs):
            blocks, old = req.block_ids, row_len[i]
            n = len(blocks)
            if self._row_blocks[i] is blocks and old <= n:   # the same list, only appended to
                if n > old:
                    bt[i, old:n] = blocks[old:]
            else:
                bt[i, :n] = blocks
                if old > n:
                    bt[i, n:old] = 0
            self._row_blocks[i] = blocks
            row_len[i] = n
        for i in range(len(reqs), r_pad + 1):
            if row_len[i]:                     # padding rows (and the spare row) stay zero
                bt[i, :row_len[i]] = 0
                row_len[i] = 0
                self._row_blocks[i] = None

    def _views(self, t_pad: int, r_pad: int, cache: bool) -> _StepViews:
        """The device-buffer slices of a padded shape, made once for the (few) graph shapes:
        slicing costs host time; eager shapes are unbounded on a CPU, so not kept."""
        key = (t_pad, r_pad)
        views = self._view_cache.get(key)
        if views is None:
            dev = self.arena.dev
            views = _StepViews(
                dev["input_ids"][:t_pad], dev["positions"][:t_pad], dev["slot_mapping"][:t_pad],
                dev["seq_lens"][:r_pad], dev["query_start_loc"][:r_pad + 1],
                dev["logits_indices"][:r_pad], dev["pending_index"][:r_pad],
                dev["pending_row"][:r_pad], self.block_table.gpu[:r_pad + 1],
                self.block_table.cpu[:r_pad + 1], dev["state_slots"][:r_pad],
                self.sampling_tensors(r_pad, all_greedy=True, any_top_k_top_p=False,
                                      num_logprobs=-1))
            if cache:
                self._view_cache[key] = views
        return views

    def _write_sampling_rows(self, chunks: Sequence[ScheduledChunk],
                             reqs: list[RequestState]) -> None:
        """Sampling parameters of every row, and the batch's sampler features; skipped when
        the rows hold the same requests as last step (steady decoding). A row's sampler state
        slot is -1 when its chunk draws no token (a prefill chunk short of the prompt's end:
        no penalties, no count update)."""
        a, n = self.arena.np, len(reqs)
        a["sampling_slots"][:n] = [c.request.sampling_slot if c.samples else -1
                                   for c in chunks]
        if reqs == self._sampling_reqs:
            return
        sps = [r.sampling_params for r in reqs]
        a["temperature"][:n] = [sp.temperature for sp in sps]
        a["top_k"][:n] = [sp.top_k if sp.top_k > 0 else self.vocab_size for sp in sps]
        a["top_p"][:n] = [sp.top_p for sp in sps]
        a["min_p"][:n] = [sp.min_p for sp in sps]
        a["seeds"][:n] = [r.seed for r in reqs]
        a["row_logprobs"][:n] = [-1 if sp.logprobs is None else sp.logprobs for sp in sps]
        self._sampling_flags = (SamplerFeatures.of_batch(sps),
                                max((sp.logprobs for sp in sps if sp.logprobs is not None),
                                    default=-1))
        self._sampling_reqs = list(reqs)

    def copy_inputs(self, desc: BatchExecutionDescriptor) -> None:
        """The staged inputs of a step of shape `desc` to the device (one kernel or copy)."""
        self.arena.copy_to_gpu(desc.num_tokens, desc.num_reqs)

    def prepare(self, chunks: Sequence[ScheduledChunk], desc: BatchExecutionDescriptor,
                prev_rows: dict[int, int] | None = None, copy: bool = True) -> StepInputs:
        """`prev_rows`: id(request) -> its row in the previous step, for requests whose last
        input token that step sampled and the host does not know yet. `copy=False` leaves
        the staged inputs' copy (`copy_inputs`) to the caller: a graph makes it itself.
        Block-table rows are copied here either way."""
        n_req, r_pad, t_pad = len(chunks), desc.num_reqs, desc.num_tokens
        a, bs = self.arena.np, self.block_size
        ids, pos, bt, slots = a["input_ids"], a["positions"], self.block_table.np, a["slot_mapping"]
        qsl, seq = a["query_start_loc"], a["seq_lens"]
        reqs = [c.request for c in chunks]
        decode = all(c.num_new_tokens == 1 for c in chunks)
        if decode:
            self._last_verify = None
        if decode or desc.uniform_query_len:
            step = (self._advance_decode(reqs, desc, prev_rows) if decode
                    else self._advance_verify(chunks, reqs, desc))
            if step is not None:
                if copy:
                    self.copy_inputs(desc)
                return step
        done_list = [r.num_computed_tokens for r in reqs]
        done = np.array(done_list, np.int64)
        pend_idx, pend_row = a["pending_index"], a["pending_row"]
        pend_idx[:r_pad] = self.scratch_index
        pend_row[:r_pad] = 0
        pending = []
        self._write_block_rows(reqs, r_pad)
        if decode:                                         # one token each
            n_tok = n_req
            try:
                ids[:n_req] = [r.all_token_ids[d] for r, d in zip(reqs, done_list)]
            except IndexError:
                toks = []
                for i, (r, d) in enumerate(zip(reqs, done_list)):
                    if d < len(r.all_token_ids):
                        toks.append(r.all_token_ids[d])
                    else:
                        toks.append(0)
                        pending.append((i, i, r))
                ids[:n_req] = toks
            rows = self._arange[:n_req]
            qsl[:n_req + 1] = self._arange[:n_req + 1]
            pos[:n_req] = done
            seq[:n_req] = done + 1
            slots[:n_req] = bt[rows, done // bs].astype(np.int64) * bs + done % bs
            a["logits_indices"][:n_req] = rows
        else:
            n_new = np.array([c.num_new_tokens for c in chunks], np.int64)
            n_tok = int(n_new.sum())
            qsl[0] = 0
            qsl[1:n_req + 1] = np.cumsum(n_new)
            for i, (r, d, lo, hi) in enumerate(zip(reqs, done_list, qsl[:n_req].tolist(),
                                                   qsl[1:n_req + 1].tolist())):
                spec = chunks[i].spec_token_ids
                if spec:                     # known tokens, then the drafts
                    hi -= len(spec)
                    ids[hi:hi + len(spec)] = spec
                known = r.all_token_ids[d:d + hi - lo]
                ids[lo:lo + len(known)] = known
                if len(known) < hi - lo:     # only ever the last one
                    ids[hi - 1] = 0
                    pending.append((i, hi - 1, r))
            pos[:n_tok] = np.repeat(done - qsl[:n_req], n_new) + self._arange[:n_tok]
            seq[:n_req] = done + n_new
            req_of_token = np.repeat(self._arange[:n_req], n_new)
            p = pos[:n_tok]
            slots[:n_tok] = bt[req_of_token, p // bs].astype(np.int64) * bs + p % bs
            a["logits_indices"][:n_req] = qsl[1:n_req + 1] - 1
        for i, index, r in pending:
            row = (prev_rows or {}).get(id(r))
            if row is None:
                raise RuntimeError("a scheduled token is unknown and was not sampled by the "
                                   "previous step")
            pend_idx[i], pend_row[i] = index, row
        self._write_sampling_rows(chunks, reqs)
        a["state_slots"][:n_req] = [r.state_slot for r in reqs]
        # padding lanes
        ids[n_tok:t_pad] = 0
        pos[n_tok:t_pad] = 0
        slots[n_tok:t_pad] = 0
        seq[n_req:r_pad] = 0
        a["state_slots"][n_req:r_pad] = 0
        if desc.uniform_query_len is not None:   # padded requests keep the uniform query length
            qsl[n_req + 1:r_pad + 1] = n_tok + desc.uniform_query_len * self._arange[1:r_pad - n_req + 1]
        else:
            qsl[n_req + 1:r_pad + 1] = n_tok
        a["temperature"][n_req:r_pad] = 0.0
        a["top_k"][n_req:r_pad] = self.vocab_size
        a["top_p"][n_req:r_pad] = 1.0
        a["min_p"][n_req:r_pad] = 0.0
        a["sampling_slots"][n_req:r_pad] = -1
        a["row_logprobs"][n_req:r_pad] = -1
        a["seeds"][n_req:r_pad] = 0
        a["logits_indices"][n_req:r_pad] = 0
        # two transfers: the arena, and the block-table rows in use
        if copy:
            self.copy_inputs(desc)
        v = self._views(t_pad, r_pad, cache=desc.mode == CUDAGraphMode.FULL)
        if self.block_table.gpu is not self.block_table.cpu:
            v.block_table.copy_(v.block_table_cpu, non_blocking=True)
        attention = StepAttentionInputs(
            num_reqs=n_req, num_tokens=n_tok, num_reqs_padded=r_pad, num_tokens_padded=t_pad,
            uniform_query_len=desc.uniform_query_len, positions=v.positions,
            slot_mapping=v.slot_mapping, seq_lens=v.seq_lens, query_start_loc=v.query_start_loc,
            block_table=v.block_table, state_slots=v.state_slots, positions_cpu=pos,
            seq_lens_cpu=seq, query_start_loc_cpu=qsl, block_table_cpu=bt)
        features, num_logprobs = self._sampling_flags
        sampling = dataclasses.replace(v.sampling, all_greedy=not features.sample,
                                       any_top_k_top_p=features.filter, num_logprobs=num_logprobs)
        step = StepInputs(desc, n_req, n_tok, v.input_ids, v.positions, v.logits_indices,
                          attention, sampling, features, v.pending_index, v.pending_row)
        self._last_decode = None
        q = desc.uniform_query_len
        self._last_verify = (step if q and q > 1 and not pending and not prev_rows
                             and all(c.samples and c.num_new_tokens == q for c in chunks)
                             else None)
        self._last_verify_reqs = reqs
        if decode and all(c.samples for c in chunks):      # the next step may advance it
            n = len(reqs)
            self._last_decode = _SteadyDecode(
                reqs, desc, step, [d + 1 for d in done_list],
                slots[:n].tolist(),
                pending_from_previous=None if pending else False)
        return step

    def _advance_decode(self, reqs: list[RequestState], desc: BatchExecutionDescriptor,
                        prev_rows: dict[int, int] | None) -> StepInputs | None:
        """Steady decoding: the last step's requests in the same rows, each one token further
        on. Positions, slots and sequence lengths advance by one, a row's block-table entries
        are written only when it enters a new block, and the last step's StepInputs (views of
        the persistent buffers, same shape) is returned again; None for any other step, which
        the general path then writes in full.

        Host time is the reason, and it is counted in calls into numpy: between the engine's
        other host work one costs 10-25x its tight-loop time (~50 µs for a `+= 1` on a CPU
        host, docs/benchmarks.md, sixth session), while Python list work and memoryview
        stores stay cheap. So the values live in Python lists and reach the pinned staging
        buffers through memoryviews. Block lists only grow while a request runs
        (engine/kv_cache.py), and the request's block for position p is allocated when p is
        scheduled.
        """
        last = self._last_decode
        if last is None or last.desc != desc or reqs != last.reqs:   # identity: eq=False
            return None
        done = [r.num_computed_tokens for r in reqs]
        if done != last.next_done:
            return None
        a, bs = self.arena.np, self.block_size
        input_ids, positions, slot_mapping, seq_lens = self._staged
        # The pending-token rows hold the same values every step of one kind, so they are
        # written when the kind changes.
        n = len(reqs)
        if not prev_rows:              # sync: the host knows every input token
            try:
                input_ids[:n] = array("q", [r.all_token_ids[d] for r, d in zip(reqs, done)])
            except IndexError:
                return None
            if last.pending_from_previous is not False:
                a["pending_index"][:n] = self.scratch_index
                a["pending_row"][:n] = 0
                last.pending_from_previous = False
        elif len(prev_rows) != n:
            return None
        elif last.pending_from_previous is not True:
            # async: each input token is the last step's sample of the same row (rows are the
            # order of `reqs`). The runner lists every row in `prev_rows`, pending or not;
            # a row whose token the host already knows gets it from `sampled` all the same,
            # which holds that token (the last step sampled it).
            a["input_ids"][:n] = 0
            a["pending_index"][:n] = self._arange[:n]
            a["pending_row"][:n] = self._arange[:n]
            last.pending_from_previous = True
        positions[:n] = array("q", done)
        last.next_done = next_done = [d + 1 for d in done]
        seq_lens[:n] = array("i", next_done)
        last.slots = slots = [s + 1 for s in last.slots]
        entering = [i for i, d in enumerate(done) if d % bs == 0]
        if entering:
            width, row_len = self.block_table.np.shape[1], self._row_len
            for i in entering:         # the request's block list grew by one
                blocks, old = reqs[i].block_ids, row_len[i]
                if len(blocks) > width:            # a flat store would spill into row i + 1
                    raise ValueError(f"request has {len(blocks)} KV blocks, the block table "
                                     f"holds {width}")
                self._block_table_words[i * width + old:i * width + len(blocks)] = \
                    array("i", blocks[old:])
                row_len[i] = len(blocks)
                slots[i] = blocks[done[i] // bs] * bs
            if self.block_table.gpu is not self.block_table.cpu:
                bt_rows = last.step.attention.block_table
                bt_rows.copy_(self.block_table.cpu[:bt_rows.shape[0]], non_blocking=True)
        slot_mapping[:n] = array("q", slots)
        self._write_moving_state_slots(reqs)
        return last.step

    @property
    def moves_state_slots(self) -> bool:
        """Whether a request's state slot changes from step to step (hybrid speculation)."""
        return self._moving_state_slots is not None

    def _write_moving_state_slots(self, reqs: list[RequestState]) -> None:
        if self._moving_state_slots is not None:
            self._moving_state_slots[:len(reqs)] = array("q", [r.state_slot for r in reqs])

    def _advance_verify(self, chunks: Sequence[ScheduledChunk], reqs: list[RequestState],
                        desc: BatchExecutionDescriptor) -> StepInputs | None:
        """Steady speculative decoding: the last step was a uniform step of the same requests
        in the same rows, each running its last token and drafts (`desc.uniform_query_len`
        rows; the host knows every token). Each request advances by what it emitted, so
        positions, slots, lengths and tokens are rewritten, through memoryviews (see
        `_advance_decode` for why), and block-table rows only where they grew; the rest
        (query starts, logits rows, sampling rows, padding lanes) is the last step's. None
        for any other step."""
        last, q = self._last_verify, desc.uniform_query_len
        if (last is None or last.desc != desc or reqs != self._last_verify_reqs
                or not all(c.samples and c.num_new_tokens == q for c in chunks)):
            return None
        bs, width = self.block_size, self.block_table.np.shape[1]
        input_ids, positions, slot_mapping, seq_lens = self._staged
        ids, pos, slots, lens = [], [], [], []
        for c, r in zip(chunks, reqs):
            d = r.num_computed_tokens
            if d >= len(r.all_token_ids) or (d + q - 1) // bs >= width:
                return None
            ids.append(r.all_token_ids[d])
            ids.extend(c.spec_token_ids)
            blocks = r.block_ids
            for p in range(d, d + q):          # past the request's blocks: the null block's
                b = p // bs
                slots.append((blocks[b] if b < len(blocks) else 0) * bs + p % bs)
            pos.extend(range(d, d + q))
            lens.append(d + q)
        n, t = len(reqs), len(pos)
        input_ids[:t] = array("q", ids)
        positions[:t] = array("q", pos)
        slot_mapping[:t] = array("q", slots)
        seq_lens[:n] = array("i", lens)
        self._write_moving_state_slots(reqs)
        if any(len(r.block_ids) != self._row_len[i] for i, r in enumerate(reqs)):
            self._write_block_rows(reqs, desc.num_reqs)
            if self.block_table.gpu is not self.block_table.cpu:
                bt_rows = last.attention.block_table
                bt_rows.copy_(self.block_table.cpu[:bt_rows.shape[0]], non_blocking=True)
        self._write_sampling_rows(chunks, reqs)
        return last
