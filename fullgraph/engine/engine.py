"""The engine: validates and admits requests, runs steps, turns samples into outputs."""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fullgraph.config import EngineConfig
from fullgraph.engine.args import EngineArgs
from fullgraph.engine.detokenizer import IncrementalDetokenizer, load_tokenizer
from fullgraph.engine.kv_cache import KVCacheManager
from fullgraph.engine.request import Request
from fullgraph.engine.scheduler import Scheduler, SchedulerOutput
from fullgraph.engine.stats import EngineStats
from fullgraph.multimodal.chat import IMAGE_SENTINEL, encode_with_images, split_images
from fullgraph.multimodal.inputs import MultiModalInputs
from fullgraph.multimodal.processor import MultiModalProcessor, load_multimodal_processor
from fullgraph.outputs import CompletionOutput, Logprob, RequestOutput
from fullgraph.sampling_params import SamplingParams
from fullgraph.worker.model_runner import ModelRunner
from fullgraph.worker.step_output import PendingStep, StepResult

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Launched:
    """A request's part in a launched step, as it was at launch."""
    request: Request
    samples: bool
    num_preemptions: int
    num_new_tokens: int = 0          # the chunk's rows, drafts included
    num_drafts: int = 0              # drafts the chunk ended with (speculative decoding)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.tokenizer = load_tokenizer(config.model.tokenizer or config.model.path)
        if config.model.vocab_size > 2 * len(self.tokenizer):   # checkpoints pad a little
            logger.warning(
                "the model's vocabulary (%d tokens) is larger than its tokenizer's (%d): "
                "sampled ids from %d up have no text, so output text may be empty while its "
                "token ids are right (the *-random presets pair real shapes with a small "
                "tokenizer)", config.model.vocab_size, len(self.tokenizer), len(self.tokenizer))
        # images -> placeholder tokens and pixels (multimodal models), before any step
        self.mm_processor: MultiModalProcessor | None = load_multimodal_processor(config.model)
        self.runner = ModelRunner(config)
        if config.compilation.graph_runtime == "fake":
            from fullgraph.worker.cudagraph.fake import FakeGraphRuntime
            self.runner.capture_graphs(FakeGraphRuntime())
        else:
            self.runner.capture_graphs()
        self.config = dataclasses.replace(
            config, cache=dataclasses.replace(config.cache, num_blocks=self.runner.num_blocks))
        cache = self.config.cache
        self.kv = KVCacheManager(cache.num_blocks, cache.block_size, cache.enable_prefix_caching,
                                 self.runner.num_state_slots,
                                 self.runner.sampling_state.num_slots,
                                 self.runner.state_slots_per_request)
        self.scheduler = Scheduler(self.config.scheduler, self.kv)
        self.requests: dict[str, Request] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._stream: set[str] = set()
        self._inflight: tuple[list[_Launched], PendingStep] | None = None
        self._rng = random.Random(config.seed)
        self.stats = EngineStats()
        logger.info("KV cache: %d blocks of %d tokens (%d tokens)", self.kv.num_usable_blocks,
                    cache.block_size, self.kv.num_usable_blocks * cache.block_size)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args.create_engine_config())

    # ---------------------------------------------------------------- requests
    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True,
                    **kwargs) -> tuple[list[int], list | None]:
        """(token ids, the messages' images or None): images in content parts
        (multimodal/chat.py) become the model's image placeholders. `kwargs` go to the
        template (a request's `chat_template_kwargs`), which they may not replace."""
        if "chat_template" in kwargs:
            raise ValueError("chat_template_kwargs may not set chat_template: the template is "
                             "the model's or --chat-template")
        return self.rendered_chat_prompt(messages, add_generation_prompt, **kwargs)[1:]

    def rendered_chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True,
                             *, chat_template: str | None = None,
                             **kwargs) -> tuple[str, list[int], list | None]:
        """`chat_prompt`, with the template's text first (vLLM's `RequestOutput.prompt` of a
        chat request); `chat_template` instead of the model's (the offline API's option, not
        a server request's)."""
        messages, images = split_images(messages)
        text = self.render_chat_template(messages, add_generation_prompt,
                                         chat_template=chat_template, **kwargs)
        if not images:
            return text, self.tokenizer.encode(text, add_special_tokens=False), None
        if self.mm_processor is None:
            raise ValueError(f"{self.config.model.architecture} takes no images")
        placeholder = self.mm_processor.placeholder_ids
        ids = encode_with_images(
            text, lambda t: self.tokenizer.encode(t, add_special_tokens=False), placeholder)
        # the text with each image spelled as its placeholder tokens, as vLLM reports it
        return text.replace(IMAGE_SENTINEL, self.tokenizer.decode(placeholder)), ids, images

    def image_placeholders(self, num_images: int) -> list[int]:
        """Prompt tokens standing for `num_images` images, one after another (ValueError
        for a model that takes none)."""
        if self.mm_processor is None:
            raise ValueError(f"{self.config.model.architecture} takes no images")
        return self.mm_processor.placeholder_ids * num_images

    def render_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                             *, chat_template: str | None = None, **kwargs) -> str:
        """The messages rendered by `chat_template`, else the model's (`--chat-template`, else
        the tokenizer's), with `kwargs` for the template; ValueError if it cannot."""
        template = (chat_template or self.config.model.chat_template
                    or getattr(self.tokenizer, "chat_template", None))
        if not template:
            raise ValueError("the model's tokenizer has no chat template (pass one with "
                             "--chat-template)")
        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=template, add_generation_prompt=add_generation_prompt,
                tokenize=False, **kwargs)
        except Exception as e:  # jinja errors, malformed messages
            raise ValueError(f"cannot apply the chat template: {e}") from e
        return text

    def make_requests(self, request_id: str, prompt: str | list[int],
                      params: SamplingParams, images=None,
                      mm_inputs: MultiModalInputs | None = None) -> list[Request]:
        """One request per sample (`params.n`), validated: `request_id` itself for n == 1,
        else "{request_id}-{i}". Sample i draws with `sample_seed(seed, i)`, so each sample is
        reproducible from the seed and its index; with prefix caching, samples 1.. wait until
        sample 0 has prefilled the prompt and share its KV blocks."""
        ids = sample_request_ids(request_id, params.n)
        first = self.make_request(ids[0], prompt, params, images, mm_inputs)
        if params.n == 1:
            return [first]
        if params.n > self.config.scheduler.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs="
                             f"{self.config.scheduler.max_num_seqs}")
        # Without prefix caching (a model with recurrent state) the leader forks the samples
        # before its last prompt token: they share its blocks and copy its state there.
        fork = (not self.kv.enable_prefix_caching and first.num_prompt_tokens > 1
                and params.prompt_logprobs is None)
        leader = first if self.kv.enable_prefix_caching or fork else None
        rest = [Request(ids[i], list(first.prompt_token_ids), params,
                        seed=sample_seed(first.seed, i), max_tokens=first.max_tokens,
                        prompt=first.prompt, index=i, leader=leader,
                        mm_inputs=first.mm_inputs)
                for i in range(1, params.n)]
        if any(r.request_id in self.requests for r in rest):
            raise ValueError(f"request id {request_id!r} is already in use")
        if fork:
            first.followers = list(rest)
        return [first, *rest]

    def make_request(self, request_id: str, prompt: str | list[int],
                     params: SamplingParams, images=None,
                     mm_inputs: MultiModalInputs | None = None) -> Request:
        """Validate one request; raises ValueError naming the problem, changes nothing.
        `images`: one image or a list (multimodal/image_processor.py's inputs) for the
        prompt's image placeholders, in order; or `mm_inputs`, the images as
        `mm_processor.process` prepared them elsewhere (with the prompt's ids it returned)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenize(prompt) if text is not None else list(prompt)
        model = self.config.model
        if not ids:
            raise ValueError("the prompt is empty")
        if params.truncate_prompt_tokens is not None:
            if images is not None or mm_inputs is not None:
                raise ValueError("truncate_prompt_tokens cannot cut a prompt with images")
            k = params.truncate_prompt_tokens
            ids = ids[-(model.max_model_len - 1 if k == -1 else k):]
        if (images is not None or mm_inputs is not None) and self.mm_processor is None:
            raise ValueError(f"{model.architecture} takes no images")
        if images is not None:
            ids, mm_inputs = self.mm_processor.process(ids, images)
        elif mm_inputs is not None:
            pass                                     # prepared off this thread
        elif self.mm_processor is not None and self.mm_processor.image_token_id in ids:
            raise ValueError(f"the prompt has image tokens (id "
                             f"{self.mm_processor.image_token_id}) but no images")
        if len(ids) >= model.max_model_len:     # first: a long prompt is refused at once
            images = ("" if mm_inputs is None else
                      f" ({sum(p.length for p in mm_inputs.placeholders)} of them for "
                      f"{len(mm_inputs.placeholders)} images)")
            raise ValueError(f"the prompt is {len(ids)} tokens{images} but max_model_len is "
                             f"{model.max_model_len}: at most {model.max_model_len - 1} prompt "
                             f"tokens leave room for one generated token")
        vocab = model.vocab_size
        for i, t in enumerate(ids):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt token {t!r} at index {i} is outside the vocabulary "
                                 f"[0, {vocab})")
        room = model.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        needed = self.kv.blocks_for(len(ids) + max_tokens)
        if needed > self.kv.num_usable_blocks:
            raise ValueError(f"the request needs {needed} KV-cache blocks for its {len(ids)} "
                             f"prompt tokens and {max_tokens} max_tokens, but the cache has "
                             f"{self.kv.num_usable_blocks} usable of {self.kv.pool.num_blocks} "
                             f"(block 0 is reserved, the null block: N blocks give N - 1); "
                             f"lower max_tokens or give the cache more memory")
        for name in ("logprobs", "prompt_logprobs"):
            asked = getattr(params, name)
            if asked is not None and asked > self.config.max_logprobs:
                raise ValueError(f"{name}={asked} exceeds max_logprobs="
                                 f"{self.config.max_logprobs}")
        for name, token_ids in (("logit_bias", params.logit_bias or {}),
                                ("allowed_token_ids", params.allowed_token_ids or ())):
            outside = [t for t in token_ids if t >= vocab]
            if outside:
                raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab}): "
                                 f"{outside[:5]}")
        if params.bad_words and not params.bad_words_token_ids:
            params.bad_words_token_ids = self._bad_words_token_ids(params.bad_words)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        return Request(request_id, ids, params, seed=seed, max_tokens=max_tokens, prompt=text,
                       mm_inputs=mm_inputs)

    def _bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word as token ids, also with a leading space where that tokenizes
        differently but as long (vLLM's rule), so the word is banned mid-sentence too."""
        out: list[list[int]] = []
        for word in words:
            plain = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            out.append(plain)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                out.append(spaced)
        return out

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    stream: bool = False, images=None) -> Request:
        return self.add(self.make_request(request_id, prompt, params, images), stream)

    def add(self, req: Request, stream: bool = False) -> Request:
        """Admit a request made by `make_request`. With stream=True, `step` reports it every
        time it gets a token; otherwise only when it finishes."""
        sp = req.sampling_params
        self._detok[req.request_id] = IncrementalDetokenizer(
            self.tokenizer, req.prompt_token_ids, sp.skip_special_tokens, sp.stop_strings,
            sp.include_stop_str_in_output,
            incremental=sp.detokenize and (stream or bool(sp.stop_strings)),
            min_tokens=sp.min_tokens, detokenize=sp.detokenize)
        self.requests[req.request_id] = req
        if stream:
            self._stream.add(req.request_id)
        self.scheduler.add(req)
        self.stats.prompt_tokens += req.num_prompt_tokens
        return req

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        req.finish_reason = "abort"
        self.stats.aborted_requests += 1
        detok = self._detok[request_id]
        if not detok.incremental:
            detok.finalize(req.output_token_ids, req.sampling_params.skip_special_tokens)
        return self._finish(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    # ---------------------------------------------------------------- weights
    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block, so no later prompt reuses KV computed before
        (after the weights changed). False, and nothing forgotten, while requests are
        unfinished: their blocks would be registered again (vLLM's behavior)."""
        if self.has_unfinished_requests():
            logger.warning("the prefix cache was not reset: %d requests are unfinished",
                           len(self.requests))
            return False
        self.kv.pool.forget_cached()
        return True

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]] | str) -> None:
        """Copy (name, tensor) pairs, transformers' checkpoint names (a `state_dict()`'s
        items, whole or any part), or a directory of safetensors files in those names, into
        the model's parameters in place, so the captured graphs run the new weights; then
        forget the prefix cache. Between requests only (ValueError while any is unfinished).
        All or nothing: a tensor the model has no place for, or of another shape, is a
        ValueError naming it before anything is copied (models/loader.update_weights). A
        speculative drafter keeps its own weights but for those it shares with the target
        (an EAGLE drafter's embedding and LM head)."""
        if self.has_unfinished_requests():
            raise ValueError(f"update_weights between requests only: {len(self.requests)} "
                             f"are unfinished (let them finish or abort them)")
        try:
            self.runner.update_weights(weights)
        finally:                       # nothing runs: the cache holds old weights' KV
            self.kv.pool.forget_cached()

    # ---------------------------------------------------------------- steps
    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step, and turn a finished step's samples into outputs. With
        async scheduling the step launched here is processed by the next call, after that
        call has launched its own, so the host's work overlaps the device's (with
        speculative decoding, where the next step can continue the one in flight:
        `_continues_in_flight`). A step launched for requests that all finished meanwhile (a
        stop token in the step before) is read at once: an idle engine has none in flight."""
        outputs = []
        if self._inflight is not None and not self._continues_in_flight():
            outputs = self._process(*self._inflight)
            self._inflight = None
        sched = self.scheduler.schedule()
        launched = self._launch(sched) if not sched.is_empty else None
        if self._inflight is not None:
            outputs += self._process(*self._inflight)
        self._inflight = None
        if launched is not None:
            if self.config.scheduler.async_scheduling and self.has_unfinished_requests():
                self._inflight = launched
            else:
                outputs += self._process(*launched)
        return outputs

    def _continues_in_flight(self) -> bool:
        """Whether the next step may be scheduled before the step in flight is read. Always
        without speculation. With it, the next step's drafts and the positions they start
        at come out of that step's verification, on the device: only a uniform verify step
        in graphs leaves them there, and only a step of the same decoding requests can read
        them. So: every running request decoded in it, none has logits the host processes
        (penalties, bans ...), none is near max_model_len, no waiting request could be
        admitted, and a verify graph takes that many requests."""
        spec = self.config.speculative
        if spec is None:
            return True
        launched, pending = self._inflight
        sched = self.scheduler
        if not pending.continuable or (sched.waiting and len(sched.running)
                                       < self.config.scheduler.max_num_seqs):
            return False
        decoded = {id(e.request) for e in launched if e.samples}
        limit = self.config.model.max_model_len - spec.num_speculative_tokens
        return (all(id(r) in decoded and r.sampling_slot < 0 and r.num_computed_tokens < limit
                    for r in sched.running)
                and self.runner.continues(len(sched.running)))

    def _launch(self, sched: SchedulerOutput) -> tuple[list[_Launched], PendingStep]:
        launched = [_Launched(s.request, s.samples, s.request.num_preemptions,
                              s.num_new_tokens, len(s.spec_token_ids)) for s in sched.scheduled]
        blocks, slots = self.kv.take_copies()
        if blocks or slots:              # forked samples' partial blocks and states
            self.runner.copy_caches(blocks, slots)
        pending = self.runner.launch(sched.scheduled)
        for s, entry in zip(sched.scheduled, launched):
            s.request.num_computed_tokens += s.num_new_tokens
            # a speculative chunk counts its drafts as accepted until its results land
            s.request.num_pending += entry.samples * (1 + entry.num_drafts)
        self.stats.steps += 1
        return launched, pending

    def _process(self, launched: list[_Launched], pending: PendingStep) -> list[RequestOutput]:
        result = pending.wait()
        now = time.monotonic()
        outputs = []
        for i, entry in enumerate(launched):
            req = entry.request
            if req.is_finished or req.num_preemptions != entry.num_preemptions:
                continue      # finished, aborted or preempted since launch: drop its sample
            if result.prompt_logprobs and i in result.prompt_logprobs:
                self._append_prompt_logprobs(req, *result.prompt_logprobs[i])
            num_new, kept = 0, entry.num_new_tokens
            if entry.samples:
                req.num_pending -= 1 + entry.num_drafts
                if result.num_emitted is not None:
                    num_new, rejected = self._append_verified(req, entry, result, i)
                    kept -= rejected
                else:
                    self._append(req, int(result.token_ids[i]), result, i)
                    num_new = 1
            self.kv.keep_state(req, kept)
            self.kv.cache_full_blocks(req)
            if not entry.samples:
                continue
            if req.first_token_time is None:
                req.first_token_time = now
                self.stats.prefilled_tokens += req.num_prompt_tokens
            req.last_token_time = now
            self.stats.generation_tokens += num_new
            if req.finish_reason is not None:
                self.stats.finished_requests += 1
                self.stats.stopped_requests += req.finish_reason == "stop"
                outputs.append(self._finish(req))
            elif req.request_id in self._stream:
                outputs.append(self._output(req))
        return outputs

    def _append_verified(self, req: Request, entry: _Launched, result: StepResult,
                         i: int) -> int:
        """A speculative step's tokens for row `i` (accepted drafts, then the target's own),
        up to the first that finishes the request; the rejected drafts' positions are
        given back (`num_computed_tokens`: their K/V is overwritten when they come again).
        The next step's drafts are kept on the request. Returns (the tokens appended, the
        drafts rejected)."""
        emitted = int(result.num_emitted[i])
        rejected = entry.num_drafts - (emitted - 1)
        req.num_computed_tokens -= rejected
        # a step continuing the one before it was scheduled with room for drafts its
        # max_tokens may not leave: the device says how many were real
        drafts = entry.num_drafts if result.num_drafts is None else int(result.num_drafts[i])
        self.stats.spec_num_drafts += drafts > 0
        self.stats.spec_num_draft_tokens += drafts
        self.stats.spec_num_accepted_tokens += emitted - 1
        req.num_draft_tokens += drafts
        req.num_accepted_tokens += emitted - 1
        for j in range(emitted):
            self._append(req, int(result.token_ids[i, j]), result, (i, j))
            if req.finish_reason is not None:
                break
        req.spec_token_ids = result.draft_token_ids[i] if req.finish_reason is None else []
        return j + 1, rejected

    def _append(self, req: Request, token: int, result: StepResult, row) -> None:
        """One sampled token for `req` (`row`: its row of the step's sample fields)."""
        req.append_token(token)
        sp = req.sampling_params
        if req.logprobs is not None and result.logprobs is not None:
            self._append_logprobs(req, result, row, sp.logprobs)
        detok = self._detok[req.request_id]
        stop_str = detok.add(token)
        if not sp.ignore_eos and token in self.config.model.eos_token_ids:
            req.finish_reason, req.stop_reason = "stop", None
        elif sp.stop_token_ids and token in sp.stop_token_ids:
            req.finish_reason, req.stop_reason = "stop", token
        elif stop_str is not None:
            req.finish_reason, req.stop_reason = "stop", stop_str
        elif req.num_output_tokens >= req.max_tokens:
            req.finish_reason = "length"
        if req.finish_reason is not None and stop_str is None:
            detok.finalize(req.output_token_ids, sp.skip_special_tokens)

    def _append_logprobs(self, req: Request, result: StepResult, row, n: int) -> None:
        lps = result.logprobs[row]
        req.logprobs.append(logprob_entry(result.logprob_token_ids[row], lps,
                                          result.ranks[row], n,
                                          self._decode_fn(req.sampling_params)))
        req.cumulative_logprob += float(lps[0])

    def _decode_fn(self, params: SamplingParams):
        """What spells a logprob's token: the tokenizer, or nothing with detokenize=False."""
        return self.tokenizer.decode if params.detokenize else None

    def _append_prompt_logprobs(self, req: Request, logprobs, token_ids, ranks) -> None:
        n = req.sampling_params.prompt_logprobs
        req.prompt_logprobs.extend(logprob_entry(ids, lps, rank, n,
                                                 self._decode_fn(req.sampling_params))
                                   for lps, ids, rank in zip(logprobs, token_ids, ranks))

    def _finish(self, req: Request) -> RequestOutput:
        self.scheduler.finish(req)
        out = self._output(req)
        del self.requests[req.request_id]
        del self._detok[req.request_id]
        self._stream.discard(req.request_id)
        return out

    def _output(self, req: Request) -> RequestOutput:
        finished = req.finish_reason is not None
        text = self._detok[req.request_id].visible_text(finished)
        completion = CompletionOutput(
            index=req.index, text=text, token_ids=list(req.output_token_ids),
            cumulative_logprob=req.cumulative_logprob if req.logprobs is not None else None,
            logprobs=list(req.logprobs) if req.logprobs is not None else None,
            finish_reason=req.finish_reason, stop_reason=req.stop_reason)
        metrics = {"arrival_time": req.arrival_time}
        for name in ("first_scheduled_time", "first_token_time", "last_token_time"):
            if getattr(req, name) is not None:
                metrics[name] = getattr(req, name)
        if finished:
            metrics["finished_time"] = time.monotonic()
        if self.config.speculative is not None:
            metrics["spec_num_draft_tokens"] = req.num_draft_tokens
            metrics["spec_num_accepted_tokens"] = req.num_accepted_tokens
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [completion],
                             finished, req.num_cached_tokens, metrics,
                             list(req.prompt_logprobs) if req.prompt_logprobs is not None
                             else None)


def logprob_entry(token_ids, logprobs, rank, n: int, decode=None) -> dict[int, Logprob]:
    """One position's logprobs as vLLM gives them: {token id: Logprob}, the chosen (or
    actual prompt) token first with its rank, then the top `n` (host rows: `token_ids` and
    `logprobs` [1 + N], the chosen token's entry first)."""
    def item(tid, lp, r):
        return Logprob(float(lp), int(r), decode([int(tid)]) if decode else None)
    entry = {int(token_ids[0]): item(token_ids[0], logprobs[0], rank)}
    for r, (tid, lp) in enumerate(zip(token_ids[1:n + 1], logprobs[1:n + 1]), start=1):
        entry.setdefault(int(tid), item(tid, lp, r))
    return entry


def sample_request_ids(request_id: str, n: int) -> list[str]:
    """The engine requests of a request with `n` samples, in index order."""
    return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]


def sample_seed(seed: int, index: int) -> int:
    """Sample `index`'s seed of an n > 1 request seeded `seed` (sample 0 keeps it): a 64-bit
    mix, so neighbouring seeds' samples do not collide."""
    if index == 0:
        return seed
    x = (seed + index * 0x9E3779B97F4A7C15) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x - 2**64 if x >= 2**63 else x
