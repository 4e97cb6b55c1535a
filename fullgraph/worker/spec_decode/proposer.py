"""The EAGLE drafter's side of a speculative step: after the target verified a step, the
drafter runs over the positions the target kept and proposes the next step's drafts.

A drafter row at position i holds token i + 1 with the target's hidden state at position i
(models/eagle.py). After a step, a request's kept positions are the ones its chunk computed
up to the last accepted one: its drafter rows carry the tokens after them (the next prompt
tokens, then the accepted drafts and the target's new token), so the last row's output gives
the first draft. Each further draft is one drafter decode step: one row per request, the
previous draft as its token and the previous output as its hidden state, at the next
position. The drafter keeps its own paged K/V under the target's block table; rows at
positions the target later rejects are overwritten when those positions come again.

The drafter's inputs go through its own `InputBuffers` (the runner's are untouched), from
request views whose token list is shifted by one (`StandInRequest`), so the general input
path, and from the second decode step the steady-decode path, fill them.

Drafts are the drafter's argmax (mapped into the target vocabulary), a deterministic drafter:
the verification then treats each draft distribution as one-hot (worker/spec_decode/
rejection.py), which keeps sampling exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from fullgraph.attention.backend import AttentionBackend, ForwardContext
from fullgraph.attention.metadata import AttentionSpec, PersistentInputs, StepAttentionInputs
from fullgraph.buffers import to_device
from fullgraph.config import CUDAGraphMode, EngineConfig
from fullgraph.worker.cudagraph.descriptor import BatchExecutionDescriptor
from fullgraph.worker.inputs import InputBuffers, StandInChunk, StandInRequest


class TokensFrom:
    """A token list that starts at position `start`: the input path reads a row's token at
    its position (an index or a slice), and only positions from `start` on are read."""
    __slots__ = ("start", "tokens")

    def __init__(self, start: int, tokens: list[int]) -> None:
        self.start, self.tokens = start, tokens

    def __len__(self) -> int:
        return self.start + len(self.tokens)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.tokens[i.start - self.start:i.stop - self.start]
        return self.tokens[i - self.start]

    def append(self, token: int) -> None:
        self.tokens.append(token)


@dataclass(frozen=True, slots=True)
class KeptRows:
    """One request's part of a verified step, for the drafter: the target rows (indices into
    the step's hidden states) of the positions it kept, starting at `start` (a position), the
    tokens those rows carry (each position's next token), and how many drafts to propose
    next (0: the chunk only fills the drafter's K/V, e.g. a prefill chunk short of the
    prompt's end)."""
    block_ids: list[int]
    start: int
    target_rows: list[int]
    next_tokens: list[int]
    num_drafts: int


class EagleProposer:
    def __init__(self, drafter: torch.nn.Module, config: EngineConfig, backend_cls,
                 device: torch.device) -> None:
        self.model = drafter
        self.config = config
        self.device = device
        self.backend_cls = backend_cls
        sched = config.scheduler
        self.buffers = InputBuffers(sched.max_num_seqs, sched.max_num_batched_tokens,
                                    config.max_blocks_per_seq, config.cache.block_size,
                                    config.model.vocab_size, device)
        specs = drafter.cache_specs(drafter.config).attention
        self.cache_spec = specs
        self.kv_caches: list = []
        self.backend = self.graph_backend = None
        self.reads_target_metadata = False
        self._graph: _GraphBuffers | None = None
        vd = getattr(drafter, "draft_vocab_size", config.model.vocab_size)
        self.maps_vocab = hasattr(drafter, "compute_draft_logits")
        self._steps = torch.arange(1, config.speculative.num_speculative_tokens,
                                   device=device)    # the drafter's decode steps after the first
        self.logits = torch.zeros(sched.max_num_seqs, vd if self.maps_vocab
                                  else config.model.vocab_size,
                                  dtype=config.model.dtype, device=device)

    def bytes_per_block(self, block_size: int) -> int:
        return self.cache_spec.bytes_per_block(block_size, self.config.model.dtype)

    def allocate_kv_cache(self, num_blocks: int, target_inputs: PersistentInputs,
                          target_backend: AttentionBackend) -> None:
        """The drafter's K/V, block for block beside the target's (same block ids), and its
        two backend instances: one over its own input buffers (eager steps), one over the
        target's (graphed steps read the target step's inputs). A graphed step's pass over
        the target's rows reads the target's attention metadata for that step where the two
        backends' `metadata_key`s are equal (`reads_target_metadata`), else metadata of its
        own."""
        att, cfg = self.cache_spec, self.config
        bs, sched = cfg.cache.block_size, cfg.scheduler
        spec = AttentionSpec(att.num_layers, att.num_heads, att.num_kv_heads, att.head_dim,
                             bs, num_blocks, sched.max_num_seqs, sched.max_num_batched_tokens,
                             cfg.max_blocks_per_seq, cfg.model.dtype)
        shape = (num_blocks * bs, att.num_kv_heads, att.head_dim)
        self.kv_caches = []                  # the memory profile's probe cache goes first
        self.kv_caches = [tuple(torch.zeros(shape, dtype=cfg.model.dtype, device=self.device)
                                for _ in range(2)) for _ in range(att.num_layers)]
        self.backend, self.graph_backend = (
            self.backend_cls(spec, self.device, inputs,
                             compile=cfg.compilation.compile_attention, policy=cfg.kernel_policy)
            for inputs in (self.buffers.persistent(), target_inputs))
        self.reads_target_metadata = (self.graph_backend.metadata_key()
                                      == target_backend.metadata_key())

    def _run(self, chunks: Sequence[StandInChunk], hidden: torch.Tensor,
             input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One eager drafter step over `chunks` with `hidden` [tokens, width]: the output
        rows of each chunk's last token, [len(chunks), H]. `input_ids`: the step's tokens on
        the device, in place of the ones the chunks' views hold (stand-ins)."""
        n_tok = sum(c.num_new_tokens for c in chunks)
        q_lens = {c.num_new_tokens for c in chunks}
        uniform = q_lens.pop() if len(q_lens) == 1 else None
        desc = BatchExecutionDescriptor(CUDAGraphMode.NONE, n_tok, len(chunks), uniform)
        step = self.buffers.prepare(chunks, desc)
        if input_ids is not None:
            step.input_ids[:input_ids.shape[0]].copy_(input_ids)
        self.backend.prepare(step.attention)
        metadata = self.backend.build(step.attention)
        self.backend.update(metadata, step.attention)
        ctx = ForwardContext(self.backend, metadata, self.kv_caches, step.attention.slot_mapping)
        out = self.model(step.input_ids, hidden, step.positions, ctx)
        return out[step.logits_indices[:len(chunks)]]

    @torch.inference_mode()
    def propose(self, kept: Sequence[KeptRows], target_hidden: torch.Tensor) -> list[list[int]]:
        """Drafts for each of `kept` ([] where none are asked). `target_hidden`: the verified
        step's hidden states the drafter reads, one row per token of the step.

        The drafts stay on the device until the last drafter step: each decode step takes
        the previous draft as its input there (its request view holds a stand-in token),
        and one read brings them all to the host."""
        drafts: list[list[int]] = [[] for _ in kept]
        live = [i for i, k in enumerate(kept) if k.target_rows]
        if not live:
            return drafts
        views = {i: StandInRequest(TokensFrom(kept[i].start, list(kept[i].next_tokens)),
                                   kept[i].start, kept[i].block_ids) for i in live}
        rows = to_device([r for i in live for r in kept[i].target_rows], self.device)
        out = self._run([StandInChunk(views[i], len(kept[i].target_rows)) for i in live],
                        target_hidden.index_select(0, rows))
        cur = [i for i in live if kept[i].num_drafts > 0]   # the requests `out` rows hold
        if not cur:
            return drafts
        if cur != live:
            out = out.index_select(0, to_device([live.index(i) for i in cur], self.device))
        steps: list[tuple[list[int], torch.Tensor]] = []    # (requests, their drafts)
        while True:
            ids = self._draft_ids(out)
            steps.append((cur, ids))
            nxt = [i for i in cur if kept[i].num_drafts > len(steps)]
            if not nxt:
                break
            for i in nxt:          # one row: the last draft, at the position after the last
                v = views[i]
                v.all_token_ids.append(0)
                v.num_computed_tokens = len(v.all_token_ids) - 1
            if nxt != cur:
                keep = to_device([cur.index(i) for i in nxt], self.device)
                ids, out = ids.index_select(0, keep), out.index_select(0, keep)
            out = self._run([StandInChunk(views[i], 1) for i in nxt], out, input_ids=ids)
            cur = nxt
        host = iter(torch.cat([ids for _, ids in steps]).tolist())   # step after step
        for reqs, _ in steps:
            for i in reqs:
                drafts[i].append(next(host))
        return drafts

    # ------------------------------------------------------------ graphed steps
    def graph_state(self, step: StepAttentionInputs, target: Any = None) -> DraftGraphState:
        """Host work for a graphed verify step's drafting, made once per captured shape
        (warmup and capture each make their own): the metadata of the drafter's pass over
        the step's rows (the target step's inputs): `target`, the target's own for the same
        descriptor (the warmup's in warmup, the captured one in capture: its graph refreshes
        it each step before the drafter's runs), or else the drafter's; and the metadata of
        its one-row decode steps, whose inputs the graph computes from the verification."""
        r = step.num_reqs_padded
        b = self.graph_backend
        if target is None:
            b.prepare(step)
            prefill = b.build(step)
        g = self._graph_buffers
        decode = StepAttentionInputs(
            num_reqs=r, num_tokens=r, num_reqs_padded=r, num_tokens_padded=r,
            uniform_query_len=1, positions=g.positions[:r], slot_mapping=g.slots[:r],
            seq_lens=g.seq_lens[:r], query_start_loc=g.query_start_loc[:r + 1],
            block_table=step.block_table, positions_cpu=step.positions_cpu,
            seq_lens_cpu=step.seq_lens_cpu, query_start_loc_cpu=np.arange(r + 1),
            block_table_cpu=step.block_table_cpu)
        b.prepare(decode)
        return DraftGraphState(prefill if target is None else target, decode, b.build(decode),
                               owns_prefill=target is None)

    def prepare_graphed(self, step: StepAttentionInputs) -> None:
        """Host work of a graphed step's drafter pass where it has metadata of its own (the
        target's `prepare` fills the target's)."""
        if not self.reads_target_metadata:
            self.graph_backend.prepare(step)

    @property
    def drafts(self) -> torch.Tensor:
        """[max_num_seqs, k]: the last graphed step's drafts, by its rows."""
        return self._graph_buffers.drafts

    @property
    def _graph_buffers(self) -> _GraphBuffers:
        if self._graph is None:
            r = self.config.scheduler.max_num_seqs
            k = self.config.speculative.num_speculative_tokens
            self._graph = _GraphBuffers(
                torch.zeros(r, k, dtype=torch.int64, device=self.device),
                torch.zeros(r, dtype=torch.int64, device=self.device),
                torch.zeros(r, dtype=torch.int64, device=self.device),
                torch.zeros(r, dtype=torch.int32, device=self.device),
                torch.arange(r + 1, dtype=torch.int32, device=self.device))
        return self._graph

    def draft_graphed(self, state: DraftGraphState, step: StepAttentionInputs,
                      next_ids: torch.Tensor, target_hidden: torch.Tensor,
                      first_rows: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Device ops only (a graph holds them): the drafts [R, k] after a verified step.

        The drafter runs over every row of the step (`next_ids` [T]: the token after each
        row; `target_hidden` the rows it reads). For a request that drew tokens, the rows
        from its last known token on carry the verification's tokens (accepted drafts, then
        the target's; rows past them carry garbage whose K/V is overwritten when those
        positions come again). Draft 1 is the output at `first_rows` [R] (the row at the
        accepted count, at position `base` [R]); each next draft a one-row step one position
        on. A position past the request's blocks (max_tokens near) writes its K/V into the
        null block: those drafts are never used (the scheduler caps them)."""
        t, r = next_ids.shape[0], first_rows.shape[0]
        k = self._steps.shape[0] + 1
        g, b = self._graph_buffers, self.graph_backend
        if state.owns_prefill:              # (the target's graph refreshed its own)
            b.update(state.prefill, step)
        ctx = ForwardContext(b, state.prefill, self.kv_caches, step.slot_mapping)
        out = self.model(next_ids, target_hidden[:t], step.positions[:t], ctx)
        last = out[first_rows]                                             # [R, H]
        drafts = g.drafts[:r]
        drafts[:, 0] = self._draft_ids(last)
        if k > 1:
            bs = self.config.cache.block_size
            top = self.config.model.max_model_len - 1
            # every decode step's positions and slots at once: [R, k - 1]
            pos = base[:, None] + self._steps
            inside = pos <= top
            pos = pos.clamp(max=top)
            block = step.block_table[g.query_start_loc[:r].long()[:, None], pos // bs].long()
            slots = (block * bs + pos % bs) * inside
            for s in range(1, k):
                g.slots[:r].copy_(slots[:, s - 1])
                g.positions[:r].copy_(pos[:, s - 1])
                torch.add(pos[:, s - 1], 1, out=g.seq_lens[:r])
                b.update(state.decode_meta, state.decode)
                ctx = ForwardContext(b, state.decode_meta, self.kv_caches, g.slots[:r])
                last = self.model(drafts[:, s - 1], last, g.positions[:r], ctx)
                drafts[:, s] = self._draft_ids(last)
        return drafts

    def _draft_ids(self, rows: torch.Tensor) -> torch.Tensor:
        """The drafter's argmax of each row, as target ids (device)."""
        logits = self.logits[:rows.shape[0]]
        if self.maps_vocab:
            self.model.compute_draft_logits(rows, out=logits)
            return self.model.draft_to_target[logits.argmax(-1)]
        self.model.compute_logits(rows, out=logits)
        return logits.argmax(-1)


@dataclass(slots=True)
class _GraphBuffers:
    """Persistent inputs of the graphed drafter's decode steps."""
    drafts: torch.Tensor            # [max_num_seqs, k]
    positions: torch.Tensor         # [max_num_seqs]
    slots: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor   # 0..max_num_seqs: one row per request


@dataclass(slots=True)
class DraftGraphState:
    """One captured shape's drafter metadata (see `EagleProposer.graph_state`)."""
    prefill: Any
    decode: StepAttentionInputs
    decode_meta: Any
    owns_prefill: bool = True        # False: `prefill` is the target's (its graph updates it)
