"""The model runner's speculative side: the drafter, the verification's buffers, and how a
speculative step runs (docs/speculative.md).

A step whose requests all decode (their last token and up to k drafts), and that fits a
captured descriptor, replays two graphs: the target's (`score_drafts`: the model over every
row, the logits of every row, the hidden states the drafter reads) and the verification plus
the drafter's steps, whose inputs are computed on the device (`create_verify_fn`); one read
of the results follows. A request with fewer than k drafts (its max_tokens near, or its
blocks short) is padded to k: the padding rows write their K/V past the request's tokens
(or into the null block) and their drafts are -1 to the verification, never accepted, so
the request emits what its real drafts give. A step with prompt chunks replays its mixed
model graph (which also computes the logits of the staged verify plan's rows) and then a
verification and drafting graph for that shape (`create_mixed_fn`, captured on the shape's
first step, which runs as below). Any other step (processed logits: bans, logit_bias,
allowed tokens, min_tokens, penalties, each scored row at its own position, its penalties
counting the drafts before it; prompt logprobs) replays the target's graph where one fits
and runs verification, one host sync for the accepted counts, and the drafter over the
positions each request kept, eagerly (`_launch_eager`).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from fullgraph.attention.backend import ForwardContext, get_backend_class
from fullgraph.buffers import CpuGpuBuffer, to_device
from fullgraph.config import CUDAGraphMode, EngineConfig
from fullgraph.models.eagle import load_drafter
from fullgraph.worker import prompt_logprobs
from fullgraph.worker.cudagraph.descriptor import BatchExecutionDescriptor
from fullgraph.worker.inputs import ScheduledChunk, StepInputs
from fullgraph.worker.sampler import penalized
from fullgraph.worker.sampler import prompt_logprobs as logprobs_of
from fullgraph.worker.spec_decode.processing import ban_words, count_emitted, process_rows
from fullgraph.worker.spec_decode.proposer import EagleProposer
from fullgraph.worker.spec_decode.rejection import rejection_sample
from fullgraph.worker.spec_decode.verify import VerifyPlan, kept_rows, verify_plan
from fullgraph.worker.step_output import PendingStep, StepResult, to_host

if TYPE_CHECKING:
    from fullgraph.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _PaddedChunk:
    """A decoding request's chunk as a graphed verify step runs it: k drafts, the last ones
    padding (`SpeculativeSteps.draft_counts` says how many are real)."""
    request: object
    num_new_tokens: int
    spec_token_ids: tuple[int, ...]
    samples: bool = True


@dataclass(frozen=True, slots=True)
class SpecGraphKey:
    """The verification and drafting graph replayed after a uniform verify step's model
    graph, for `num_reqs` rows; greedy rows only, or any."""
    num_reqs: int
    greedy: bool


@dataclass(frozen=True, slots=True)
class MixedSpecKey:
    """The verification and drafting graph replayed after a mixed step's model graph (a step
    with prompt chunks, captured on first use); greedy rows only, or any."""
    desc: BatchExecutionDescriptor
    greedy: bool


class SpeculativeSteps:
    def __init__(self, runner: ModelRunner, config: EngineConfig) -> None:
        """After the target is loaded, before the KV cache is sized (the drafter's K/V
        counts in every block)."""
        self.runner = runner
        spec, target = config.speculative, config.model
        self.k = k = spec.num_speculative_tokens
        self.max_model_len = target.max_model_len
        drafter = load_drafter(spec.method, spec.model, spec.hf_config, target.dtype,
                               target.max_model_len, runner.device, config.kernel_policy)
        drafter.use_target_weights(*runner.model.drafter_weights())
        drafter.check_target(target.hf_config)
        # The target hidden states the drafter reads: the inputs of some target layers,
        # captured in a persistent buffer (EAGLE-3), or the final states (EAGLE-1), which a
        # graphed step copies into one.
        layers = drafter.aux_hidden_state_layers(target.hf_config)
        tokens, dev = config.scheduler.max_num_batched_tokens, runner.device
        self.draft_hidden = (runner.model.enable_aux_hidden_states(layers, tokens) if layers
                             else torch.zeros(tokens, target.hf_config.get_text_config()
                                              .hidden_size, dtype=target.dtype, device=dev))
        self.reads_final_states = not layers
        self.proposer = EagleProposer(drafter, config,
                                      get_backend_class(config.attention_backend,
                                                        config.kernel_policy), dev)
        # every request's k + 1 scored rows; for graphed steps also the slot-0 positions and
        # the verification's tokens and accepted counts
        r = config.scheduler.max_num_seqs
        self.logits = torch.zeros(r * (k + 1), target.vocab_size, dtype=target.dtype,
                                  device=dev)
        self.positions = torch.zeros(r, dtype=torch.int64, device=dev)
        self.tokens = torch.zeros(r, k + 1, dtype=torch.int64, device=dev)
        self.accepted = torch.zeros(r, dtype=torch.int64, device=dev)
        # per request of a graphed step: the drafts it was scheduled with (the rest of its k
        # are padding), and how many of them its max_tokens leaves room for (the same, but
        # for a row continuing the step in flight: there, at that step's full acceptance)
        self.draft_counts = CpuGpuBuffer((r, 2), torch.int64, dev, pin=dev.type == "cuda")
        # Async scheduling: a uniform verify step may start before the step in flight is
        # read, its rows continuing that step's on the device (`continue_rows`), which leaves
        # each row's real drafts and what it rejected (scheduled drafts - accepted) here.
        self.overlap = config.scheduler.async_scheduling
        self.real_drafts = torch.zeros(r, dtype=torch.int64, device=dev)
        self.rejected = torch.zeros(r, dtype=torch.int64, device=dev)
        self.num_continued = 0           # steps that continued the one in flight
        # where graphed steps' results land on the host, in turn (a step's are read before
        # the step after next launches)
        self._results_host = [torch.zeros(r * (2 * k + 3), dtype=torch.int64,
                                          pin_memory=dev.type == "cuda") for _ in range(2)]
        self._draft_index = torch.arange(k, device=dev)
        self._row_index = torch.arange(r, device=dev)
        self._q_index = torch.arange(k + 1, device=dev)
        # A mixed step's verify plan on the device (its model graph computes the logits of
        # the plan's rows): per request its k + 1 scored rows, k drafts (-1: none), the
        # position slot 0 predicts, its last known token's row, how many rows from there
        # carry the verification's tokens (0: the chunk draws none), and for a chunk short
        # of its prompt's end its last row and the token after it (-1: none).
        self.plan = CpuGpuBuffer((r, 2 * k + 6), torch.int64, dev, pin=dev.type == "cuda")
        self._next_ids = torch.zeros(tokens + 1, dtype=torch.int64, device=dev)  # + scratch
        self._mixed_pending: set[MixedSpecKey] = set()
        self._mixed_failed: set[MixedSpecKey] = set()

    def bytes_per_block(self, block_size: int) -> int:
        return self.proposer.bytes_per_block(block_size)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.proposer.allocate_kv_cache(num_blocks, self.runner.buffers.persistent(),
                                        self.runner.backend)

    def profile(self) -> None:
        """The memory profile's share: a sampled verification of every row."""
        r, q = self.tokens.shape
        rejection_sample(self.tokens[:, 1:], self.logits.view(r, q, -1),
                         self.runner.buffers.sampling_tensors(
                             r, all_greedy=False, any_top_k_top_p=True, num_logprobs=-1))

    def graph_keys(self, descs: Sequence[BatchExecutionDescriptor]) -> list[SpecGraphKey]:
        """The verification graphs of the uniform verify descriptors' request counts."""
        rows = sorted({d.num_reqs for d in descs if d.uniform_query_len == self.k + 1},
                      reverse=True)
        return [SpecGraphKey(r, greedy) for r in rows for greedy in (True, False)]

    # ------------------------------------------------------------ graphed steps
    def score_drafts(self, step: StepInputs, ctx: ForwardContext) -> torch.Tensor:
        """A step's model part (a graph holds it): the target's hidden states of every row
        (returned), (EAGLE-1) copied into the drafter's buffer, and for a uniform verify step
        every row's logits."""
        hidden = self.runner._forward_hidden(step, ctx)
        n = step.desc.num_tokens
        if self.reads_final_states:
            self.draft_hidden[:n].copy_(hidden[:n])
        q = self.k + 1
        if step.desc.uniform_query_len == q:
            self.runner.model.compute_logits(hidden[:n], out=self.logits[:n])
        else:                                   # the staged plan's rows (in range at capture)
            r = step.desc.num_reqs
            rows = self._plan_columns(r)[0].reshape(-1).clamp(0, n - 1)
            self.runner.model.compute_logits(hidden.index_select(0, rows),
                                             out=self.logits[:r * q])
        return hidden[:n]

    def _plan_columns(self, r: int) -> tuple[torch.Tensor, ...]:
        """The device plan's columns for `r` requests: rows [r, q], drafts [r, k], then
        [r] each: slot-0 positions, last known rows, rows carrying tokens, tail rows, tail
        tokens."""
        p, q, k = self.plan.gpu[:r], self.k + 1, self.k
        return (p[:, :q], p[:, q:q + k], *(p[:, q + k + i] for i in range(5)))

    def _stage_plan(self, chunks: Sequence[ScheduledChunk], plan: VerifyPlan,
                    num_reqs_padded: int) -> None:
        """The verify plan of a mixed step into the device plan (one copy); padding
        requests score row 0 and draw nothing."""
        a, r, q, k = self.plan.np, len(chunks), self.k + 1, self.k
        a[:r, :q] = plan.rows
        a[:r, q:q + k] = plan.drafts
        a[:r, q + k] = plan.positions
        a[:r, q + k + 1] = plan.rows[:, 0]
        tails = []
        for c, d, start in zip(chunks, plan.num_drafts, plan.starts):
            req = c.request
            end = req.num_computed_tokens + c.num_new_tokens
            tails.append((d + 1, 0, -1) if c.samples
                          else (0, start + c.num_new_tokens - 1, req.all_token_ids[end]))
        a[:r, q + k + 2:] = tails
        a[r:num_reqs_padded] = 0
        a[r:num_reqs_padded, q:q + k] = -1
        a[r:num_reqs_padded, q + k + 4] = -1
        self.plan.copy_to_gpu(num_reqs_padded)

    def create_fn(self, key: SpecGraphKey | MixedSpecKey, warmup: bool):
        return (self.create_verify_fn(key, warmup) if isinstance(key, SpecGraphKey)
                else self.create_mixed_fn(key, warmup))

    def _draft_state(self, desc: BatchExecutionDescriptor, step: StepInputs, warmup: bool):
        """The drafter's graph state for a step of `desc` (captured after the target's
        graphs): over the target's attention state of the same descriptor where the drafter
        reads the target's metadata, the warmup's in warmup and the captured one in capture
        (a state initialized lazily in the warmup run would be captured without its
        initialization otherwise, and replay reading buffers nothing fills)."""
        pair = (self.runner.attention_states.get(desc) if self.proposer.reads_target_metadata
                else None)
        target = None if pair is None else (pair.warmup if warmup else pair.captured).attention
        return self.proposer.graph_state(step.attention, target)

    def create_verify_fn(self, key: SpecGraphKey, warmup: bool):
        """The verification and the drafter's steps after a uniform verify step of
        `key.num_reqs` requests, device ops only: the graph replayed after the model's."""
        runner, q = self.runner, self.k + 1
        desc = BatchExecutionDescriptor(CUDAGraphMode.FULL, key.num_reqs * q, key.num_reqs, q)
        step = runner.buffers.prepare(runner._dummy_chunks(desc), desc)
        state = self._draft_state(desc, step, warmup)
        r = key.num_reqs
        sampling = dataclasses.replace(
            runner.buffers.sampling_tensors(r, all_greedy=key.greedy,
                                            any_top_k_top_p=not key.greedy, num_logprobs=-1),
            positions=self.positions[:r])

        def forward():
            torch.sub(step.attention.seq_lens[:r], self.k, out=self.positions[:r])
            drafts = step.input_ids[:r * q].view(r, q)[:, 1:]
            scheduled = self.draft_counts.gpu[:r, 0]
            real = self._draft_index < (self.real_drafts[:r] if self.overlap
                                        else scheduled)[:, None]
            verified = rejection_sample(torch.where(real, drafts, -1),
                                        self.logits[:r * q].view(r, q, -1), sampling)
            self.tokens[:r].copy_(verified.token_ids)
            self.accepted[:r].copy_(verified.num_accepted)
            accepted = self.accepted[:r]
            if self.overlap:         # what a step continuing this one reads (`continue_rows`)
                torch.sub(scheduled, accepted, out=self.rejected[:r])
                torch.gather(self.tokens[:r], 1, accepted[:, None],
                             out=runner.sampled[:r, None])
            first = self._row_index[:r] * q + accepted        # row 0 of request i: i q
            base = (step.attention.seq_lens[:r].long() - q).clamp(min=0) + accepted
            return self.proposer.draft_graphed(state, step.attention,
                                               self.tokens[:r].clamp(min=0).view(-1),
                                               self.draft_hidden, first, base)

        return forward, None

    def create_mixed_fn(self, key: MixedSpecKey, warmup: bool):
        """The verification and the drafter's steps after a mixed step of `key.desc`, from
        the staged plan, device ops only: the graph replayed after the model's. The drafter
        runs over every row, each carrying the token after it: the next input id, but from a
        drawing chunk's last known row on the verification's tokens, and at a short chunk's
        last row the host's next prompt token."""
        runner, q = self.runner, self.k + 1
        desc = key.desc
        r, t = desc.num_reqs, desc.num_tokens
        step = runner.buffers.prepare(runner._dummy_chunks(desc), desc)
        state = self._draft_state(desc, step, warmup)
        _, drafts, positions, last, carried, tail_row, tail_token = self._plan_columns(r)
        sampling = dataclasses.replace(
            runner.buffers.sampling_tensors(r, all_greedy=key.greedy,
                                            any_top_k_top_p=not key.greedy, num_logprobs=-1),
            positions=positions)
        next_ids = self._next_ids

        def forward():
            verified = rejection_sample(drafts, self.logits[:r * q].view(r, q, -1), sampling)
            self.tokens[:r].copy_(verified.token_ids)
            self.accepted[:r].copy_(verified.num_accepted)
            next_ids[:t - 1].copy_(step.input_ids[1:t])
            at = torch.where(self._q_index < carried[:, None], last[:, None] + self._q_index, t)
            next_ids.index_put_((at.reshape(-1),), self.tokens[:r].clamp(min=0).reshape(-1))
            next_ids.index_put_((torch.where(tail_token >= 0, tail_row, t),),
                                tail_token.clamp(min=0))
            accepted = self.accepted[:r]
            return self.proposer.draft_graphed(state, step.attention, next_ids[:t],
                                               self.draft_hidden, last + accepted,
                                               positions - 1 + accepted)

        return forward, None

    def _capture_mixed(self) -> None:
        """Capture the mixed steps' verification graphs asked for since the last step (such
        a step ran eagerly); a failed capture leaves its steps eager."""
        keys = sorted(self._mixed_pending, key=lambda key: -key.desc.num_tokens)
        self._mixed_pending.clear()
        runner = self.runner
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        try:
            with torch.inference_mode():
                runner.graphs.capture(keys, runner._create_forward_fn, progress=False)
        except Exception:      # out of memory, say: those steps stay eager, serving goes on
            logger.exception("capturing speculative graphs of mixed steps %s failed; such "
                             "steps stay eager", [key.desc.num_tokens for key in keys])
            self._mixed_failed.update(keys)
        finally:
            runner._last_step = None

    def continue_rows(self, step: StepInputs) -> None:
        """Device ops, in a uniform verify step's model graph before its metadata (async
        scheduling): the rows of requests continuing the verify step in flight, which the
        host scheduled before that step's results came back, as if it had accepted every
        draft. Such a row (`pending_index` set, `pending_row` its row in that step) moves
        back by the drafts that step rejected: its positions (MRoPE rows too), slots and
        sequence length; it carries that step's drafter's drafts, as many as its max_tokens
        then leaves room for (the host staged the room at full acceptance); its state slot
        (hybrid targets) becomes the one of its group holding the state after the accepted
        rows. Its first token, the target's own of that step, comes in through
        `pending_index` as any pending token does. Rows that continue nothing keep their
        values."""
        if not self.overlap:
            return
        runner, q = self.runner, self.k + 1
        r, att = step.desc.num_reqs, step.attention
        cont = step.pending_index[:r] != runner.buffers.scratch_index
        prev = step.pending_row[:r]
        back = torch.where(cont, self.rejected[prev], 0)
        att.seq_lens[:r].sub_(back.to(att.seq_lens.dtype))
        pos = step.positions[:r * q].view(r, q)
        pos.sub_(back[:, None])
        bs, width = runner.block_size, att.block_table.shape[1]
        blocks = att.block_table[:r].gather(1, (pos // bs).clamp(max=width - 1)).long()
        att.slot_mapping[:r * q].view(r, q).copy_(blocks * bs + pos % bs)
        counts = self.draft_counts.gpu[:r]
        real = torch.where(cont, torch.minimum(counts[:, 0], counts[:, 1] + back).clamp(min=0),
                           counts[:, 0])
        self.real_drafts[:r].copy_(real)
        carried = torch.where(self._draft_index < real[:, None], self.proposer.drafts[prev], 0)
        ids = step.input_ids[:r * q].view(r, q)[:, 1:]
        ids.copy_(torch.where(cont[:, None], carried, ids))
        if runner.buffers.moves_state_slots:
            slots = att.state_slots[:r]
            kept = (slots - 1).clamp(min=0) // q * q + 1 + self.accepted[prev]
            slots.copy_(torch.where(cont & (slots > 0), kept, slots))
        if runner.mm is not None:
            runner.mm.rope_positions.gpu[:r * q].view(r, q, -1).sub_(back[:, None, None])

    def continues(self, num_reqs: int) -> bool:
        """Whether a step of `num_reqs` requests may continue the verify step in flight:
        async scheduling, and a verify graph for that many."""
        return (self.overlap and self.runner.graphs is not None
                and self.runner.dispatcher.has_uniform_graph(num_reqs))

    # ------------------------------------------------------------ launching
    def launch(self, chunks: Sequence[ScheduledChunk]) -> PendingStep:
        runner, k, r = self.runner, self.k, len(chunks)
        # a row whose last token the step in flight draws: the engine checked `continues`
        continuing = any(c.request.num_computed_tokens >= len(c.request.all_token_ids)
                         for c in chunks)
        if runner._inputs_copied is not None:
            runner._inputs_copied.synchronize()    # the staging buffers are rewritten now
        if not continuing:            # captures rewrite what a continuing step reads
            if runner.dispatcher.pending and runner.graphs is not None:
                runner._capture_pending()
            if self._mixed_pending:
                self._capture_mixed()
        if runner.graphs is not None and all(self._graphable(c) for c in chunks):
            desc = runner.dispatcher.dispatch(r * (k + 1), r, k + 1)
            if desc.mode == CUDAGraphMode.FULL:
                return self._launch_graphs(chunks, desc, continuing)
        if continuing:
            raise RuntimeError("a speculative step continuing the one in flight runs in the "
                               "verify graphs only (the engine asks `continues` first)")
        return self._launch_eager(chunks)

    def _graphable(self, c: ScheduledChunk, processed: bool = False) -> bool:
        """A decoding chunk (its last token and its drafts) with room for k drafts' positions
        within max_model_len, whose logits are not processed (unless `processed`)."""
        req, d = c.request, len(c.spec_token_ids)
        return (c.samples and c.num_new_tokens == d + 1
                and (processed or req.sampling_slot < 0)
                and req.num_computed_tokens + self.k < self.max_model_len)

    def _padded(self, chunks: Sequence[ScheduledChunk]) -> list[ScheduledChunk]:
        """Decoding chunks as a uniform verify step runs them: each with k drafts, after its
        real ones zeros (`draft_counts` says how many are real)."""
        q = self.k + 1
        return [c if c.num_new_tokens == q else
                _PaddedChunk(c.request, q, tuple(c.spec_token_ids)
                             + (0,) * (q - c.num_new_tokens)) for c in chunks]

    def _prepare(self, chunks: Sequence[ScheduledChunk], desc: BatchExecutionDescriptor,
                 copy: bool = True, images: tuple | None = None,
                 prev_rows: dict[int, int] | None = None) -> StepInputs:
        """`images`: the step's image rows (a multimodal target's, eager steps only);
        `prev_rows`: the rows of the step in flight, for requests continuing it."""
        runner = self.runner
        t0 = time.perf_counter()
        step = runner.buffers.prepare(chunks, desc, prev_rows, copy=copy)
        if runner.mm is not None:         # MRoPE rows: drafts continue the text positions
            runner.mm.write_rope_positions(chunks, desc.num_tokens)
            runner.mm.step_images = images
        runner._reset_sampling_slots(chunks)
        runner._last_step = None
        runner._prepare_metadata(step)
        runner.prepare_seconds += time.perf_counter() - t0
        return step

    def _logprobs(self, result: StepResult, logits: torch.Tensor, tokens: torch.Tensor,
                  num_logprobs: int) -> None:
        """The emitted tokens' logprobs, from the scored rows' raw logits."""
        r, q = tokens.shape
        lps = logprobs_of(logits, tokens.clamp(min=0).view(-1), num_logprobs)
        result.logprobs, result.logprob_token_ids, result.ranks = (
            t.view(r, q, *t.shape[1:]).cpu().numpy() for t in lps)

    def _launch_graphs(self, chunks: Sequence[ScheduledChunk], desc: BatchExecutionDescriptor,
                       continuing: bool = False) -> PendingStep:
        runner, r = self.runner, len(chunks)
        counts = self.draft_counts.np
        counts[:r, 0] = [len(c.spec_token_ids) for c in chunks]
        # a continuing request's room at its step in flight's full acceptance (`num_pending`
        # counts that step's tokens so)
        counts[:r, 1] = ([c.request.max_tokens - c.request.num_output_tokens
                          - c.request.num_pending - 1 for c in chunks] if continuing
                         else counts[:r, 0])
        self.draft_counts.copy_to_gpu(r)
        copied_in_graph = runner._graph_copies_inputs(desc)
        step = self._prepare(self._padded(chunks), desc, copy=not copied_in_graph,
                             prev_rows=runner._last_rows if continuing else None)
        if runner._inputs_copied is not None and not copied_in_graph:
            runner._inputs_copied.record()
        if self.overlap:
            runner._last_rows = {id(c.request): i for i, c in enumerate(chunks)}
        self.num_continued += continuing
        self.proposer.prepare_graphed(step.attention)
        runner.graphs.replay(desc)
        return self._read(chunks, step, runner.graphs.replay(
            SpecGraphKey(desc.num_reqs, step.sampling.all_greedy)), uniform=True)

    def _finish_mixed(self, chunks: Sequence[ScheduledChunk], step: StepInputs,
                      key: MixedSpecKey) -> PendingStep:
        """After a mixed step's model graph: its verification and drafting graph."""
        self.proposer.prepare_graphed(step.attention)
        return self._read(chunks, step, self.runner.graphs.replay(key), uniform=False)

    def _read(self, chunks: Sequence[ScheduledChunk], step: StepInputs,
              drafts: torch.Tensor, uniform: bool) -> PendingStep:
        """A graphed step's one copy to the host, queued: the tokens, the accepted counts,
        the next drafts (a chunk that draws none emits none) and, after a uniform verify
        step with async scheduling, the real drafts; logprobs where asked. Nothing here
        waits for the device. Such a step can be continued before it is read."""
        runner, r, q, k = self.runner, len(chunks), self.k + 1, self.k
        continuable = uniform and self.overlap
        columns = [self.tokens[:r], self.accepted[:r, None], drafts[:r]]
        if continuable:
            columns.append(self.real_drafts[:r, None])
        rows = torch.cat(columns, 1)
        width = rows.shape[1]
        tensors = [to_host(rows, self._results_host[runner.num_steps % 2][:r * width]
                           .view(r, width))]
        num_logprobs = step.sampling.num_logprobs
        if num_logprobs >= 0:
            tensors += [to_host(t) for t in logprobs_of(
                self.logits[:r * q], self.tokens[:r].clamp(min=0).view(-1), num_logprobs)]
        draws = np.array([c.samples for c in chunks])

        def build(arrays: tuple[np.ndarray, ...]) -> StepResult:
            host = arrays[0]
            result = StepResult(host[:, :q], num_emitted=np.where(draws, host[:, q] + 1, 0),
                                draft_token_ids=host[:, q + 1:q + 1 + k].tolist(),
                                num_drafts=host[:, -1] if continuable else None)
            if num_logprobs >= 0:
                result.logprobs, result.logprob_token_ids, result.ranks = (
                    a.reshape(r, q, *a.shape[1:]) for a in arrays[1:])
            return result
        runner.num_steps += 1
        event = None
        if runner.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return PendingStep(tuple(tensors), event, build=build, continuable=continuable)

    def _target_hidden(self, chunks: Sequence[ScheduledChunk], owed
                       ) -> tuple[StepInputs, torch.Tensor, VerifyPlan, torch.Tensor | None]:
        """The target's part of a step the verification graph does not take: (its inputs,
        its hidden states, the verify plan over their rows, every row's logits where a
        graph computed them). A graph replays it where one fits: a step of decoding chunks
        (logits processed) padded to k drafts as the verification graph's steps are, whose
        graph computes the logits too, or a step with prompt chunks in a mixed graph. Steps
        owing prompt logprobs run eagerly (those read every token's hidden state)."""
        runner, k, r = self.runner, self.k, len(chunks)
        plan = verify_plan(chunks, k)
        n_tok = sum(c.num_new_tokens for c in chunks)
        # a step with image tokens runs eagerly: their embeddings replace the token ones
        images = runner.mm.step_image_rows(chunks) if runner.mm is not None else None
        if runner.graphs is not None and not owed and images is None:
            padded = None
            if all(self._graphable(c, processed=True) for c in chunks):
                padded = self._padded(chunks)
                desc = runner.dispatcher.dispatch(r * (k + 1), r, k + 1)
            else:
                desc = runner.dispatcher.dispatch(n_tok, r, None)
            if desc.mode == CUDAGraphMode.FULL:
                if padded is None:
                    self._stage_plan(chunks, plan, desc.num_reqs)
                step = self._prepare(padded or chunks, desc,
                                     copy=not runner._graph_copies_inputs(desc))
                hidden = runner.graphs.replay(desc)
                if padded is None:            # the graph computed the plan's rows' logits
                    return step, hidden, plan, self.logits[:r * (k + 1)]
                padded_plan = dataclasses.replace(verify_plan(padded, k), drafts=plan.drafts,
                                                  num_drafts=plan.num_drafts)
                return step, hidden, padded_plan, self.logits[:r * (k + 1)]
        step = self._prepare(chunks, runner.dispatcher.eager(n_tok, r, None), images=images)
        metadata = runner._build_metadata(step)
        runner._update_metadata(metadata, step)
        return step, runner._forward_hidden(step, runner._context(step, metadata)), plan, None

    def _launch_eager(self, chunks: Sequence[ScheduledChunk]) -> PendingStep:
        runner, k, r = self.runner, self.k, len(chunks)
        owed = (prompt_logprobs.plan(chunks)
                if any(c.request.prompt_logprobs is not None for c in chunks) else None)
        step, hidden, plan, logits = self._target_hidden(chunks, owed)
        desc = step.desc
        if (desc.mode == CUDAGraphMode.FULL and desc.uniform_query_len is None
                and not any(c.request.sampling_slot >= 0 for c in chunks)):
            key = MixedSpecKey(desc, step.sampling.all_greedy)
            if runner.graphs.has(key):
                return self._finish_mixed(chunks, step, key)
            if key not in self._mixed_failed:
                self._mixed_pending.add(key)
        if logits is None:                # (the step's host arrays reach the device unwaited)
            rows = to_device(plan.rows, runner.device).view(-1)
            logits = runner.model.compute_logits(hidden[rows], out=self.logits[:r * (k + 1)])
        positions = to_device(plan.positions, runner.device)
        sampling = dataclasses.replace(step.sampling.rows(0, r), positions=positions)
        drafts = to_device(plan.drafts, runner.device)
        processed = sampling.state_slots is not None and any(c.request.sampling_slot >= 0
                                                             for c in chunks)
        scored = logits
        if processed:
            penalties = any(penalized(c.request.sampling_params) for c in chunks)
            scored = process_rows(logits, drafts, runner.sampling_state,
                                  sampling.state_slots, positions, penalties)
            ban_words(scored, chunks, plan)
        verified = rejection_sample(drafts, scored.view(r, k + 1, -1), sampling)
        host = torch.cat([verified.token_ids, verified.num_accepted[:, None]],
                         dim=1).cpu().numpy()               # one read: tokens, accepted
        result = StepResult(np.ascontiguousarray(host[:, :k + 1]))
        if sampling.num_logprobs >= 0:
            self._logprobs(result, logits, verified.token_ids, sampling.num_logprobs)
        kept, emitted = kept_rows(chunks, plan, result.token_ids, host[:, k + 1], k,
                                  runner.block_size)
        if processed:                     # the emitted tokens count for later penalties
            count_emitted(runner.sampling_state, sampling.state_slots, verified.token_ids,
                          emitted)
        result.num_emitted = np.array(emitted, np.int64)
        result.draft_token_ids = self.proposer.propose(
            kept, hidden if self.reads_final_states else self.draft_hidden)
        if owed:
            result.prompt_logprobs = prompt_logprobs.compute(runner.model, runner._hidden, owed)
        runner.num_steps += 1
        return PendingStep((), None, ready=result)
