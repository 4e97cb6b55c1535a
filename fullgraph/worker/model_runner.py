"""Runs one engine step on the device: inputs -> persistent buffers -> model -> sampler.

The runner owns the model, the KV cache, the persistent input buffers and the attention
backend. It knows requests only through the small `RequestState` protocol.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import torch

from fullgraph.attention.backend import ForwardContext, get_backend_class
from fullgraph.attention.gdn import GDNMetadata, GDNMetadataBuilder
from fullgraph.attention.metadata import AttentionSpec
from fullgraph.config import CUDAGraphMode, EngineConfig
from fullgraph.layers import pdl
from fullgraph.layers.argmax import argmax_rows
from fullgraph.models.interface import CacheSpecs
from fullgraph.models.loader import load_model, update_weights
from fullgraph.worker.compile_worker import CompileWorkers
from fullgraph.worker.compilers import (configure_compilers, start_compile_workers,
                                        triton_compile_ahead)
from fullgraph.worker.cudagraph.descriptor import BatchExecutionDescriptor, Dispatcher
from fullgraph.worker.cudagraph.manager import (CaptureReport, CUDAGraphManager, CUDAGraphRuntime,
                                                GraphRuntime)
from fullgraph.worker import prompt_logprobs
from fullgraph.worker.encoder_graphs import EncoderGraphManager
from fullgraph.worker.inputs import (InputBuffers, ScheduledChunk, StandInChunk,
                                     StandInRequest, StepInputs)
from fullgraph.worker.multimodal_steps import MultimodalSteps
from fullgraph.worker.sampler import (ALL_FEATURES, SamplerFeatures, SamplerOutput,
                                      SamplingState, SamplingTensors, multi_token_bad_words,
                                      sample, word_bans)
from fullgraph.worker.spec_decode.steps import MixedSpecKey, SpecGraphKey, SpeculativeSteps
from fullgraph.worker.step_output import PendingStep, to_host

logger = logging.getLogger(__name__)

# A CPU has no memory-profiling step: the default cache is capped, for its host memory only
# (a CPU step's attention reads the step's blocks, not the cache: attention/gathered.py).
CPU_DEFAULT_MAX_BLOCKS = 2048
GRAPH_RESERVE_BYTES = 1 << 30   # left free for CUDA graphs and the sampler's workspace


@dataclass(slots=True)
class StepMetadata:
    """A step's metadata for each cache kind: the attention backend's, and the linear-attention
    layers' (attention/gdn.py; None for models without them). A captured graph keeps the one
    it was captured with (its attention state)."""
    attention: Any
    state: GDNMetadata | None


@dataclass(frozen=True, slots=True)
class SamplerGraphKey:
    """The sampler's graph for `num_reqs` rows of the persistent logits, doing `features`.
    Model graphs end with greedy argmax; a step that samples replays the smallest sampler
    variant that covers its features after its model graph, so the model is captured once
    per descriptor, not once per sampler kind."""
    num_reqs: int
    features: SamplerFeatures


# The sampler variants captured for every request count, cheapest first: temperature only
# (nano-vllm's benchmark and most RL rollouts), with top-k / top-p / min_p, and everything
# (penalties, logit_bias, allowed tokens, min_tokens, logprobs).
SAMPLER_VARIANTS = (SamplerFeatures(sample=True), SamplerFeatures(sample=True, filter=True),
                    ALL_FEATURES)


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        comp = config.compilation
        self._compile_workers = None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            configure_compilers()
            if (comp.compile_ahead and comp.graph_runtime == "cuda"
                    and comp.cudagraph_mode != CUDAGraphMode.NONE):
                # Started now, they are ready when capture needs them (closed there, or
                # when the runner is collected).
                self._compile_workers = start_compile_workers()
        t0 = time.perf_counter()
        self.model = load_model(config.model, self.device, config.kernel_policy)
        if comp.compile_layers and hasattr(self.model, "compile_layers"):
            self.model.compile_layers()
        logger.info("loaded %s in %.1f s%s", config.model.path, time.perf_counter() - t0,
                    ", batch-invariant mode" if config.kernel_policy.batch_invariant else "")
        self.cache_specs: CacheSpecs = self.model.cache_specs(config.model.hf_config,
                                                               config.kernel_policy)
        sched = config.scheduler
        self.max_num_tokens = sched.max_num_batched_tokens
        self.max_num_seqs = sched.max_num_seqs
        self.block_size = config.cache.block_size
        self.buffers = InputBuffers(sched.max_num_seqs, sched.max_num_batched_tokens,
                                    config.max_blocks_per_seq, self.block_size,
                                    config.model.vocab_size, self.device,
                                    moving_state_slots=config.speculative is not None
                                    and self.cache_specs.state is not None)
        # [rows, vocab] logits of the sampled positions, in the model's dtype: persistent, so
        # a sampler graph can read what any model graph wrote.
        self.logits = torch.zeros(sched.max_num_seqs, config.model.vocab_size,
                                  dtype=config.model.dtype, device=self.device)
        # speculative decoding: the drafter and the verification (worker/spec_decode/steps.py)
        self.spec = SpeculativeSteps(self, config) if config.speculative is not None else None
        self.sampled = self.buffers.sampled     # each step's samples, the next step's inputs
        # Where steps' samples land on the host, in turn: the engine waits for a step's
        # results (PendingStep.wait copies them out) before it launches the step after next,
        # and a new pinned tensor per step costs ~7 µs of host time
        # (benchmarks/probes/host_copy_launch.py).
        pin = self.device.type == "cuda"
        self._sampled_host = [torch.zeros(sched.max_num_seqs, dtype=torch.int64, pin_memory=pin)
                              for _ in range(2)]
        to_host(self.sampled[:1])      # compiles the samples' copy kernel before any warmup
        self.async_scheduling = sched.async_scheduling
        self._last_rows: dict[int, int] = {}       # async only: id(request) -> its row
        self._last_step: StepInputs | None = None
        # Recorded after each step's host->device input copies (see `launch`); inside a
        # graph by an event node (`external`), on a branch of its own (`_copy_inputs`).
        cuda = self.device.type == "cuda"
        self._inputs_copied = torch.cuda.Event(external=True) if cuda else None
        self._event_stream = torch.cuda.Stream(self.device) if cuda else None
        self.backend_cls = get_backend_class(config.attention_backend, config.kernel_policy)
        # Per-request state (linear-attention layers) is allocated first, at its fixed size:
        # the KV cache gets what memory is left.
        self.state_caches = self._allocate_state_caches()
        self.state_backend = (GDNMetadataBuilder(self.max_num_seqs, self.max_num_tokens,
                                                 self.device, self.state_slots_per_request)
                              if self.cache_specs.state is not None else None)
        # The sampler's per-request state (penalties, logit_bias, allowed tokens, min_tokens),
        # one slot per running request that uses any (engine/kv_cache.py hands them out); a
        # slot is reset when a request first uses it, and again after a preemption.
        self.sampling_state = SamplingState.allocate(self.max_num_seqs,
                                                     config.model.vocab_size, self.device)
        # (request, its preemption count) whose state each slot holds; the request object
        # itself, not its id(), which a later request may reuse
        self._sampling_slot_owner: list[tuple[Any, int] | None] = [None] * self.max_num_seqs
        # requests in the batch whose banned tokens change per step (multi-token bad words),
        # and the word bans their slots hold now
        self._step_ban_requests: list = []
        self._slot_bans: dict[int, frozenset[int]] = {}
        # Multimodal models: rotary positions, images' encoder outputs, encoder graphs. Set
        # before the memory profile, whose forward reads them.
        self.mm = (MultimodalSteps(self.model, config, self.device, self.max_num_tokens)
                   if getattr(self.model, "multimodal", False) else None)
        self.prepare_seconds = 0.0     # host time writing step inputs (graph steps: all of it)
        self.state_prepare_seconds = 0.0   # of which the linear-attention metadata
        # everything a step reads is set by now: the memory profile runs one
        self.num_blocks = config.cache.num_blocks or self._default_num_blocks()
        self._allocate_kv_cache(self.num_blocks)
        self.dispatcher = Dispatcher(config.compilation.cudagraph_mode,
                                     config.compilation.cudagraph_capture_sizes,
                                     self.max_num_seqs, self.max_num_tokens,
                                     pad_eager=self.device.type == "cuda",
                                     decode_query_len=self.spec.k + 1 if self.spec else 1,
                                     lazy_sizes=config.compilation.lazy_capture_sizes)
        self.graphs: CUDAGraphManager | None = None
        self.attention_states: dict = {}
        self.capture_report: CaptureReport | None = None
        self.compiles_during_capture = 0
        self._warmup_compiles = 0
        self._hidden: torch.Tensor | None = None   # the last eager step's hidden states
        # PIECEWISE graphs: the forward context each captured its attention calls with
        self._piecewise_contexts: dict[BatchExecutionDescriptor, ForwardContext] = {}
        self.num_steps = 0

    @property
    def encoder_graphs(self) -> EncoderGraphManager | None:
        """A multimodal model's encoder graphs (made by `capture_graphs`), else None."""
        return self.mm.encoder_graphs if self.mm is not None else None

    def update_weights(self, weights) -> None:
        """(name, tensor) pairs or a directory into the model's parameters in place, all or
        nothing (`LLMEngine`)."""
        update_weights(self.model, weights, self.config.model, self.device)

    # ---------------------------------------------------------------- memory
    @property
    def kv_bytes_per_block(self) -> int:
        """Of every model's KV: the target's, and the drafter's beside it."""
        own = self.cache_specs.attention.bytes_per_block(self.block_size, self.config.model.dtype)
        return own + (self.spec.bytes_per_block(self.block_size) if self.spec else 0)

    @property
    def state_slots_per_request(self) -> int:
        """One per verified position under speculative decoding (layers/gdn/state.py)."""
        return self.spec.k + 1 if self.spec is not None else 1

    @property
    def num_state_slots(self) -> int:
        """Slots the requests can take (slot 0, the null slot, not counted); 0 without state."""
        if self.cache_specs.state is None:
            return 0
        return self.max_num_seqs * self.state_slots_per_request

    def _allocate_state_caches(self) -> list[tuple[torch.Tensor, ...]]:
        """Per linear-attention layer, its state tensors [num_state_slots + 1, *shape]."""
        spec = self.cache_specs.state
        if spec is None:
            return []
        dtype = self.config.model.dtype
        return [tuple(torch.zeros(self.num_state_slots + 1, *t.shape, dtype=t.dtype or dtype,
                                  device=self.device) for t in spec.tensors)
                for _ in range(spec.num_layers)]

    def _default_num_blocks(self) -> int:
        per_seq = self.config.max_blocks_per_seq
        if self.device.type != "cuda":
            return min(self.max_num_seqs * per_seq, max(CPU_DEFAULT_MAX_BLOCKS, per_seq)) + 1
        return self._profile_num_blocks()

    def _profile_num_blocks(self) -> int:
        """Blocks that fit in gpu_memory_utilization after weights and a max-size step."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        probe_blocks = -(-self.max_num_tokens // self.block_size) + 1
        self._allocate_kv_cache(probe_blocks)
        self._profile_run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        kv_probe = probe_blocks * self.kv_bytes_per_block
        del self.kv_caches, self.backend
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        non_torch = total - free - torch.cuda.memory_reserved()
        budget = (total * self.config.cache.gpu_memory_utilization - (peak - kv_probe)
                  - non_torch - GRAPH_RESERVE_BYTES)
        num = int(budget // self.kv_bytes_per_block)
        if num < 2:
            raise ValueError("not enough GPU memory for a KV cache: raise "
                             "gpu_memory_utilization or lower max_num_batched_tokens")
        # No point in more blocks than max_num_seqs full-length requests can use.
        return min(num, self.max_num_seqs * self.config.max_blocks_per_seq + 1)

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        att = self.cache_specs.attention
        spec = AttentionSpec(att.num_layers, att.num_heads, att.num_kv_heads, att.head_dim,
                             self.block_size, num_blocks, self.max_num_seqs, self.max_num_tokens,
                             self.config.max_blocks_per_seq, self.config.model.dtype)
        self.attention_spec = spec
        # One tensor per layer and K/V, not views of one allocation: an in-place custom op on
        # them, if compiled, stays in place only when the mutated inputs share no base
        # (views would make inductor copy the whole base; tests/test_qk_norm_rope.py).
        shape = (num_blocks * self.block_size, att.num_kv_heads, att.head_dim)
        self.kv_caches = [tuple(torch.zeros(shape, dtype=self.config.model.dtype,
                                            device=self.device) for _ in range(2))
                          for _ in range(att.num_layers)]
        self.backend = self.backend_cls(spec, self.device, self.buffers.persistent(),
                                        compile=self.config.compilation.compile_attention,
                                        policy=self.config.kernel_policy)
        if self.spec is not None:
            self.spec.allocate_kv_cache(num_blocks)

    @torch.inference_mode()
    def copy_caches(self, blocks: list[tuple[int, int]], slots: list[tuple[int, int]]) -> None:
        """Copy KV blocks (every attention layer's, the drafter's too) and state slots (every
        state tensor of every linear-attention layer), (source, destination) pairs, on the
        device before the next step: a fork of a prompt's samples (engine/scheduler.py)."""
        if blocks:
            bs = self.block_size
            src, dst = (torch.tensor([b * bs + j for b in side for j in range(bs)],
                                     device=self.device) for side in zip(*blocks))
            caches = self.kv_caches + (self.spec.proposer.kv_caches if self.spec else [])
            for layer in caches:
                for t in layer:
                    t.index_copy_(0, dst, t.index_select(0, src))
        if slots:
            src, dst = (torch.tensor(side, device=self.device) for side in zip(*slots))
            for layer in self.state_caches:
                for t in layer:
                    t.index_copy_(0, dst, t.index_select(0, src))

    @torch.inference_mode()
    def _profile_run(self) -> None:
        """A max-size prefill, all of it writing into the null block, and the general sampler
        over every row."""
        desc = BatchExecutionDescriptor(CUDAGraphMode.NONE, self.max_num_tokens, 1, None)
        step = self.buffers.prepare(self._dummy_chunks(desc), desc)
        self._prepare_metadata(step)
        self._forward_eager(step)
        sample(self.logits, self._sampling_variant(self.max_num_seqs, ALL_FEATURES),
               ALL_FEATURES, self.sampling_state)
        if self.spec is not None:
            self.spec.profile()

    def _dummy_chunks(self, desc: BatchExecutionDescriptor) -> list[StandInChunk]:
        """Requests that fill `desc` (at most max_model_len tokens each), all in block 0."""
        if desc.uniform_query_len is not None:
            lens = [desc.uniform_query_len] * desc.num_reqs
        else:
            per_req = self.config.model.max_model_len
            n = desc.num_tokens
            lens = [min(per_req, n - i) for i in range(0, n, per_req)][:desc.num_reqs]
        blocks = [0] * self.config.max_blocks_per_seq
        return [StandInChunk(StandInRequest([0] * m, 0, blocks), m) for m in lens]

    # ---------------------------------------------------------------- graphs
    def capture_graphs(self, runtime: GraphRuntime | None = None) -> CaptureReport | None:
        """Capture a model graph per descriptor and a sampler graph per request count and
        feature set (`SAMPLER_VARIANTS`); afterwards steps that fit replay."""
        workers, self._compile_workers = self._compile_workers, None
        try:
            return self._capture_graphs(runtime, workers)
        finally:
            if workers is not None:
                workers.close()
            if self.graphs is not None:    # later (lazy) captures compile in the process
                self.graphs.compile_ahead = None

    def _capture_graphs(self, runtime: GraphRuntime | None,
                        workers: CompileWorkers | None) -> CaptureReport | None:
        descs = self.dispatcher.descriptors_to_capture()
        piecewise = self.dispatcher.graph_mode == CUDAGraphMode.PIECEWISE
        if not descs or not (self.backend_cls.supports_cudagraph or piecewise):
            return None           # (attention is outside PIECEWISE graphs: any backend)
        ahead = None
        if runtime is None:
            runtime = CUDAGraphRuntime(self.device)
            ahead = partial(triton_compile_ahead, workers) if workers is not None else None
        self.graphs = CUDAGraphManager(runtime, ahead)
        rows = sorted({d.num_reqs for d in descs}, reverse=True)
        keys = descs + ([SamplerGraphKey(r, f) for r in rows for f in SAMPLER_VARIANTS]
                        if self.spec is None else [])
        compiles0 = compile_count()
        # Decode descriptors warm up first: they need most of the kernel variants (row bucket,
        # split count), which compile-ahead's workers then compile while (flex backend) a mixed
        # descriptor compiles the packed FlexAttention kernel here (dynamo and inductor: the
        # longest compile, when no memory-profiling step compiled it before).
        decode_first = sorted(keys, key=lambda k: getattr(k, "uniform_query_len", None) is None)
        with torch.inference_mode():
            pairs, report = self.graphs.capture(keys, self._create_forward_fn,
                                                warmup_order=decode_first)
            self.attention_states = {k: v for k, v in pairs.items() if k in descs}
            if self.spec is not None:    # the drafter's graphs, over the target's states
                _, spec_report = self.graphs.capture(self.spec.graph_keys(descs),
                                                     self._create_forward_fn)
                report = report.merged(spec_report)
        if isinstance(runtime, CUDAGraphRuntime):
            pdl.launch_outside_graph(self.device)   # else replays run slower (layers/pdl.py)
        self.compiles_during_capture = compile_count() - compiles0 - self._warmup_compiles
        self.dispatcher.captured = set(descs)
        self.capture_report = report
        if self.mm is not None:
            self.mm.capture_encoder_graphs(runtime)
        return report

    def _capture_pending(self) -> None:
        """Capture the lazy graph sizes steps asked for since the last step (a step of such a
        size ran eagerly), into the same pool; and a sampler graph per feature set for a
        request count no graph had. The warmups and captures write the persistent buffers
        with dummy steps: the one input a launched step still owes the next (its samples,
        read on the device under async scheduling) is kept aside meanwhile."""
        descs = sorted(self.dispatcher.pending, key=lambda d: -d.num_tokens)
        self.dispatcher.pending.clear()
        have = {k.num_reqs for k in self.graphs.graphs if isinstance(k, SamplerGraphKey)}
        rows = sorted({d.num_reqs for d in descs} - have, reverse=True)
        keys = descs + ([SamplerGraphKey(r, f) for r in rows for f in SAMPLER_VARIANTS]
                        if self.spec is None else [])   # (lazy sizes are mixed steps)
        if self.device.type == "cuda":     # a launched step may still read the staging
            torch.cuda.synchronize(self.device)
        sampled = self.sampled.clone()
        try:
            with torch.inference_mode():
                pairs, _ = self.graphs.capture(keys, self._create_forward_fn, progress=False,
                                               collect=False)
        except Exception:      # out of memory, say: those sizes stay eager, serving goes on
            logger.exception("capturing graphs of %s tokens failed; such steps stay eager",
                             [d.num_tokens for d in descs])
            self.dispatcher.lazy_sizes = tuple(
                s for s in self.dispatcher.lazy_sizes if s not in {d.num_tokens for d in descs})
            return
        finally:
            self.sampled.copy_(sampled)
            self._last_step = None
        self.attention_states.update((k, v) for k, v in pairs.items() if k in descs)
        self.dispatcher.captured = self.dispatcher.captured | set(descs)

    def _create_forward_fn(self, key, warmup: bool):
        if isinstance(key, SamplerGraphKey):
            sampling = self._sampling_variant(key.num_reqs, key.features)
            return (lambda: self._sample(sampling, key.features)), None
        if isinstance(key, SpecGraphKey | MixedSpecKey):
            return self.spec.create_fn(key, warmup)
        compiles0 = compile_count()
        copies = self._graph_copies_inputs(key)
        step = self.buffers.prepare(self._dummy_chunks(key), key, copy=not copies)
        self._prepare_metadata(step)
        metadata = self._build_metadata(step)
        piecewise = None
        if key.mode == CUDAGraphMode.PIECEWISE:
            assert self.spec is None, "speculative steps are not cut into pieces"
            # attention runs between the pieces, with each step's own metadata (set on the
            # context before a replay); this one is for the warmup or capture run itself
            self.backend.update(metadata.attention, step.attention)
            piecewise = self.graphs.runtime.between_pieces

        continues = self.spec is not None and key.uniform_query_len == self.spec.k + 1

        def forward():
            if copies:
                self._copy_inputs(key)
            if continues:
                self.spec.continue_rows(step)
            if piecewise is None:
                self._update_metadata(metadata, step)
            elif metadata.state is not None:
                self.state_backend.update(metadata.state, step.attention)
            ctx = self._context(step, metadata, piecewise)
            out = (self._run_model(step, ctx) if self.spec is None
                   else self.spec.score_drafts(step, ctx))
            if piecewise is not None and not warmup:
                self._piecewise_contexts[key] = ctx
            if copies and self._event_stream is not None:
                torch.cuda.current_stream().wait_stream(self._event_stream)   # rejoin
            if warmup:
                self._warmup_compiles += compile_count() - compiles0
            return out

        return forward, metadata

    @staticmethod
    def _graph_copies_inputs(desc: BatchExecutionDescriptor) -> bool:
        """Whether a graph step's input copy runs inside its graph, or eagerly before the
        replay as for eager steps. Inside, the host launches nothing before the replay: a
        launch behind a running step costs tens of µs of host time
        (benchmarks/probes/host_copy_launch.py). But replays run at another speed without an
        eager PDL kernel just before them, faster or slower by request count (docs/benchmarks.md,
        eleventh session): in the graph from 2 to 32 requests, eager for 1 and above 32."""
        return desc.mode == CUDAGraphMode.FULL and 1 < desc.num_reqs <= 32

    def _copy_inputs(self, desc: BatchExecutionDescriptor) -> None:
        """A graph step's input copy, made by its graph. `_inputs_copied` is recorded on a
        side branch (the forward rejoins it at its end), so no model kernel waits on the event
        node (inline, it measured the same)."""
        self.buffers.copy_inputs(desc)
        if self._event_stream is not None:
            self._event_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._event_stream):
                self._inputs_copied.record()

    def _sampling_variant(self, num_reqs: int, features: SamplerFeatures) -> SamplingTensors:
        """The sampling inputs a sampler graph of `features` is captured with (a graph cannot
        branch): every feature of the variant on. A row that uses none of them draws the same
        token as without (worker/sampler.py)."""
        return self.buffers.sampling_tensors(
            num_reqs, all_greedy=not features.sample, any_top_k_top_p=features.filter,
            num_logprobs=self.config.max_logprobs if features.logprobs else -1)

    def _captured_sampler(self, features: SamplerFeatures) -> SamplerFeatures:
        """The cheapest captured sampler variant that covers a step's features."""
        return next(f for f in SAMPLER_VARIANTS if f.covers(features))

    def _reset_sampling_slots(self, chunks: Sequence[ScheduledChunk]) -> None:
        """Load a request's sampler state into its slot when it first uses it, and again
        after a preemption (with the tokens it generated so far); eager, on the step's
        stream, before the step."""
        self._step_ban_requests = []
        for c in chunks:
            req = c.request
            slot = req.sampling_slot
            if slot < 0:
                continue
            owner = self._sampling_slot_owner[slot]
            if owner is None or owner[0] is not req or owner[1] != req.num_preemptions:
                self.sampling_state.reset_slot_from_params(
                    slot, req.sampling_params, req.prompt_token_ids, req.output_token_ids,
                    self.config.model.eos_token_ids)
                self._sampling_slot_owner[slot] = (req, req.num_preemptions)
                self._slot_bans.pop(slot, None)
            if multi_token_bad_words(req.sampling_params):
                self._step_ban_requests.append(req)

    def _update_step_bans(self) -> None:
        """Ban the last token of each multi-token bad word whose other tokens end a request's
        output (vLLM's rule; the scheduler runs such requests only with their output known)."""
        for req in self._step_ban_requests:
            bans = word_bans(req.sampling_params, req.output_token_ids)
            if self._slot_bans.get(req.sampling_slot, frozenset()) != bans:
                self.sampling_state.set_step_bans(req.sampling_slot, bans)
                self._slot_bans[req.sampling_slot] = bans

    # ---------------------------------------------------------------- step
    def _prepare_metadata(self, step: StepInputs) -> None:
        """Host work of every cache kind's metadata (never inside a graph)."""
        self.backend.prepare(step.attention)
        if self.state_backend is not None:
            t0 = time.perf_counter()
            self.state_backend.prepare(step.attention)
            self.state_prepare_seconds += time.perf_counter() - t0

    def _build_metadata(self, step: StepInputs) -> StepMetadata:
        state = (self.state_backend.build(step.attention) if self.state_backend is not None
                 else None)
        return StepMetadata(self.backend.build(step.attention), state)

    def _update_metadata(self, metadata: StepMetadata, step: StepInputs) -> None:
        """Device work (captured inside graphs)."""
        self.backend.update(metadata.attention, step.attention)
        if metadata.state is not None:
            self.state_backend.update(metadata.state, step.attention)

    def _run_model(self, step: StepInputs, ctx: ForwardContext) -> torch.Tensor:
        """The model, its logits into `self.logits`, and the greedy token of every row into
        `self.sampled`."""
        r = step.desc.num_reqs
        hidden = self._forward_hidden(step, ctx)
        logits = self.logits[:r]
        # one token per request: the rows are the requests' already (no gather kernel)
        rows = hidden[:r] if step.desc.uniform_query_len == 1 else hidden[step.logits_indices]
        self.model.compute_logits(rows, out=logits)
        return argmax_rows(logits, out=self.sampled[:r])

    def _context(self, step: StepInputs, metadata: StepMetadata,
                 piecewise: Any = None) -> ForwardContext:
        """The forward context of a step (`piecewise`: the graph runtime's
        `between_pieces`, for PIECEWISE graphs)."""
        mm = self.mm.context_inputs(step.desc.num_tokens) if self.mm is not None else None
        return ForwardContext(self.backend, metadata.attention, self.kv_caches,
                              step.attention.slot_mapping, self.state_caches, metadata.state,
                              mm, piecewise)

    def _forward_hidden(self, step: StepInputs, ctx: ForwardContext) -> torch.Tensor:
        """The model's hidden states of the step's tokens (also kept as `_hidden`)."""
        # Synchronous steps never have pending tokens; the arena's copy kernel may fill them.
        if self.async_scheduling and not self.buffers.arena.merges:
            self.buffers.input_ids.index_put_((step.pending_index,),
                                              self.sampled[step.pending_row])
        hidden = self._hidden = self.model(step.input_ids, step.positions, ctx)
        return hidden

    def _sample(self, sampling: SamplingTensors, features: SamplerFeatures) -> SamplerOutput:
        r = sampling.temperature.shape[0]
        out = sample(self.logits[:r], sampling, features, self.sampling_state)
        self.sampled[:r].copy_(out.token_ids)
        return out

    def _forward_eager(self, step: StepInputs) -> torch.Tensor:
        """After `_prepare_metadata`."""
        metadata = self._build_metadata(step)
        self._update_metadata(metadata, step)
        return self._run_model(step, self._context(step, metadata))

    def continues(self, num_reqs: int) -> bool:
        """Whether the next step, `num_reqs` requests that all decoded in the step in flight,
        may be launched before that step is read (speculative decoding with async
        scheduling: its inputs then come from the device, worker/spec_decode/steps.py).
        Without speculation any step may."""
        return self.spec is None or self.spec.continues(num_reqs)

    @torch.inference_mode()
    def launch(self, chunks: Sequence[ScheduledChunk]) -> PendingStep:
        """Queue one step on the device and the copy of its samples to the host; returns
        without waiting. A chunk may end at a token the previous launched step sampled."""
        if self.spec is not None:
            return self.spec.launch(chunks)      # it captures pending graphs itself
        if self.dispatcher.pending and self.graphs is not None:
            self._capture_pending()
        n_tok = sum(c.num_new_tokens for c in chunks)
        q_lens = {c.num_new_tokens for c in chunks}
        uniform = q_lens.pop() if len(q_lens) == 1 else None
        if self._inputs_copied is not None:
            # The previous step's host->device copies read the pinned staging buffers that
            # are rewritten now; with a step in flight they may not have run yet. (A fresh
            # event reports complete.)
            self._inputs_copied.synchronize()
        t0 = time.perf_counter()
        # prompt logprobs still owed: the step runs eagerly, to keep every token's hidden state
        owed = (prompt_logprobs.plan(chunks)
                if any(c.request.prompt_logprobs is not None for c in chunks) else None)
        # a step with image tokens runs eagerly: their embeddings replace the token ones
        images = self.mm.step_image_rows(chunks) if self.mm is not None else None
        desc = (self.dispatcher.dispatch(n_tok, len(chunks), uniform)
                if not owed and images is None
                else self.dispatcher.eager(n_tok, len(chunks), uniform))
        copied_in_graph = self._graph_copies_inputs(desc)
        step = self.buffers.prepare(chunks, desc, self._last_rows, copy=not copied_in_graph)
        if self.mm is not None:
            self.mm.write_rope_positions(chunks, desc.num_tokens)
            self.mm.step_images = images
        # A steady decode step (the last step's StepInputs again) keeps every request's row
        # and sampler state.
        if step is not self._last_step:
            if self.async_scheduling:
                self._last_rows = {id(c.request): i for i, c in enumerate(chunks)}
            self._reset_sampling_slots(chunks)
        self._update_step_bans()
        self._last_step = step
        self._prepare_metadata(step)
        self.prepare_seconds += time.perf_counter() - t0
        if self._inputs_copied is not None and not copied_in_graph:
            self._inputs_copied.record()
        features = step.features
        if desc.mode == CUDAGraphMode.PIECEWISE:
            attention = self.backend.build(step.attention)     # this step's, for the
            self.backend.update(attention, step.attention)     # attention between pieces
            self._piecewise_contexts[desc].metadata = attention
        if desc.mode != CUDAGraphMode.NONE:
            self.graphs.replay(desc)
            out = None if features.greedy_only else self.graphs.replay(
                SamplerGraphKey(desc.num_reqs, self._captured_sampler(features)))
        else:
            self._forward_eager(step)
            out = None if features.greedy_only else self._sample(step.sampling, features)
        prompt_lps = prompt_logprobs.compute(self.model, self._hidden, owed) if owed else None
        self.num_steps += 1
        n = step.num_reqs
        tensors = [self.sampled[:n], None, None, None]
        if out is not None and step.sampling.num_logprobs >= 0:
            tensors[1:] = out.logprobs[:n], out.logprob_token_ids[:n], out.ranks[:n]
        host = (to_host(tensors[0], self._sampled_host[self.num_steps % 2][:n]),
                *(to_host(t) for t in tensors[1:]))
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return PendingStep(host, event, prompt_lps)


def compile_count() -> int:
    """Graphs compiled by torch.compile so far in this process (for recompile checks)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])
