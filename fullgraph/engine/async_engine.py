"""`AsyncLLMEngine`: the `LLMEngine` behind one background thread, for asyncio callers.

The engine is not thread-safe, so exactly one thread, the step loop here, touches it:
validation, admission, steps and aborts all happen there, in the order callers asked for
them (one FIFO inbox). Outputs go back to the caller's event loop with
`call_soon_threadsafe`, one call per step. The loop blocks on the inbox when there is no
work, so an idle server uses no CPU. A step that raises fails the requests it was running,
not the loop; the next request gets a fresh start. Work that must not overlap any request
(a weight update) waits in `call_when_idle` until the requests in flight finish, while
requests submitted after it wait for it.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fullgraph.engine.engine import LLMEngine, sample_request_ids
from fullgraph.engine.stats import EngineSnapshot, StatLogger
from fullgraph.multimodal.inputs import MultiModalInputs
from fullgraph.outputs import RequestOutput
from fullgraph.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """A request failed for a reason other than its own input (a step raised, shutdown)."""


class EngineStopped(EngineError):
    """The engine was shut down (a server's 503: the service is going away, not broken)."""


@dataclass(slots=True, frozen=True)
class ChatPrompt:
    """Messages rendered with the tokenizer's chat template on the engine thread."""
    messages: tuple[dict, ...]
    add_generation_prompt: bool = True
    template_kwargs: tuple[tuple[str, object], ...] = ()


PromptInput = str | list[int] | ChatPrompt


@dataclass(slots=True, frozen=True)
class GenerationItem:
    request_id: str
    prompt: PromptInput
    params: SamplingParams
    # the prompt's images, preprocessed off the engine thread (the prompt is then its
    # expanded token ids)
    mm_inputs: MultiModalInputs | None = None


@dataclass(slots=True, eq=False)
class GenerationStream:
    """The outputs of one API call: one or more engine requests sharing a queue, one per
    sample of each item (item i's sample j at index i * n + j). Iterating yields (index,
    RequestOutput) until every request has finished; an engine failure is raised as
    EngineError."""
    owner: "AsyncLLMEngine"
    request_ids: list[str]
    prompt_token_ids: list[list[int]]
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: set[int] = field(default_factory=set)

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while len(self.finished) < len(self.request_ids):
            item = await self.outputs.get()
            if isinstance(item, BaseException):
                self.finished.update(range(len(self.request_ids)))
                raise item
            index, out = item
            if out.finished:
                self.finished.add(index)
            yield index, out

    def abort(self) -> None:
        """Abort the requests that have not finished (a client went away); idempotent."""
        live = [rid for i, rid in enumerate(self.request_ids) if i not in self.finished]
        self.finished.update(range(len(self.request_ids)))
        if live:
            self.owner.abort(live)


@dataclass(slots=True)
class _Add:
    items: list[GenerationItem]
    stream: GenerationStream
    loop: asyncio.AbstractEventLoop
    admitted: asyncio.Future


@dataclass(slots=True)
class _Call:
    """`fn(engine)` to run once no request is unfinished; its result or error goes to `done`.
    `abort`: the requests unfinished when it arrives are aborted instead of awaited."""
    fn: Callable[[LLMEngine], object]
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future
    abort: bool = False


@dataclass(slots=True)
class _Route:
    stream: GenerationStream
    index: int
    loop: asyncio.AbstractEventLoop


_STOP = object()


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, strict_max_tokens: bool = True) -> None:
        """strict_max_tokens: reject prompt + max_tokens > max_model_len (as OpenAI and vLLM
        servers do) instead of shortening max_tokens (as the offline API does)."""
        self.engine = engine
        self.strict_max_tokens = strict_max_tokens
        self.snapshot = EngineSnapshot()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._routes: dict[str, _Route] = {}
        self._calls: list[_Call] = []      # waiting for the requests in flight to finish
        self._held: list[_Add] = []        # submitted after a waiting call: admitted after it
        self._step_errors = 0
        self._dead: BaseException | None = None
        self._stat_logger = StatLogger() if engine.config.log_stats else None
        self._publish()
        self._thread = threading.Thread(target=self._run, name="fullgraph-engine", daemon=True)
        self._thread.start()

    @property
    def config(self):
        return self.engine.config

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    # ---------------------------------------------------------------- caller side
    async def submit(self, items: list[GenerationItem]) -> GenerationStream:
        """Validate and admit all items, or none: raises ValueError naming the bad item."""
        if not self.is_alive:
            raise EngineError(f"the engine is not running: {self._dead}")
        loop = asyncio.get_running_loop()
        stream = GenerationStream(self, [rid for it in items
                                         for rid in sample_request_ids(it.request_id, it.params.n)],
                                  [])
        admitted = loop.create_future()
        self._inbox.put(_Add(items, stream, loop, admitted))
        try:
            stream.prompt_token_ids = await admitted
        except asyncio.CancelledError:
            self.abort(stream.request_ids)   # queued after the add, so it undoes it
            raise
        return stream

    def abort(self, request_ids: list[str]) -> None:
        self._inbox.put(("abort", list(request_ids)))

    async def call_when_idle(self, fn: Callable[[LLMEngine], object],
                             abort_running: bool = False) -> object:
        """`fn(engine)` on the engine thread once the requests in flight have finished (those
        submitted after this call wait for it): its result, or its exception raised here.
        `abort_running`: the requests in flight are aborted instead (their streams end with
        finish_reason "abort"), as SGLang's `abort_all_requests` does before a weight update."""
        if not self.is_alive:
            raise EngineError(f"the engine is not running: {self._dead}")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._inbox.put(_Call(fn, loop, done, abort_running))
        return await done

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop: running requests fail with EngineError; waits for the thread."""
        if self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self._stop(self._drain(block=False))   # adds that raced the stop

    # ---------------------------------------------------------------- engine thread
    def _run(self) -> None:
        try:
            while True:
                busy = self.engine.has_unfinished_requests()
                cmds = self._drain(block=not busy and not self._calls)
                if _STOP in cmds:
                    self._stop(cmds)
                    return
                for cmd in cmds:
                    self._handle(cmd)
                if self._calls and not self.engine.has_unfinished_requests():
                    self._run_calls()
                if self.engine.has_unfinished_requests():
                    self._step()
                self._publish()
                if self._stat_logger is not None:
                    self._stat_logger.observe(self.snapshot)
        except BaseException as e:  # a bug in this loop: fail everyone, refuse new work
            logger.exception("the engine loop died")
            self._dead = e
            error = EngineError(f"the engine loop died: {e!r}")
            self._fail_all(error)
            self._refuse_waiting(error)

    def _stop(self, cmds: list) -> None:
        self._dead = EngineStopped("the engine was shut down")
        self._fail_all(self._dead)
        self._refuse_waiting(self._dead)
        for cmd in cmds:
            if isinstance(cmd, _Add):
                _resolve(cmd.loop, cmd.admitted, error=self._dead)
            elif isinstance(cmd, _Call):
                _resolve(cmd.loop, cmd.done, error=self._dead)

    def _refuse_waiting(self, error: EngineError) -> None:
        for call in self._calls:
            _resolve(call.loop, call.done, error=error)
        for add in self._held:
            _resolve(add.loop, add.admitted, error=error)
        self._calls, self._held = [], []

    def _run_calls(self) -> None:
        """The waiting calls, in order, then the submissions held behind them."""
        calls, self._calls = self._calls, []
        for call in calls:
            try:
                _resolve(call.loop, call.done, result=call.fn(self.engine))
            except Exception as e:  # ValueError: bad input; either way the caller hears it
                _resolve(call.loop, call.done, error=e)
        held, self._held = self._held, []
        for add in held:
            self._admit(add)

    def _drain(self, block: bool) -> list:
        """The commands waiting in the inbox; with `block`, waits for one (or, while the stats
        line still has an idle engine to report, until that line is due)."""
        cmds = []
        if block:
            timeout = self._stat_logger.seconds_to_next() if self._stat_logger else None
            try:
                cmds.append(self._inbox.get(timeout=timeout))
            except queue.Empty:
                return cmds
        while True:
            try:
                cmds.append(self._inbox.get_nowait())
            except queue.Empty:
                return cmds

    def _handle(self, cmd) -> None:
        if isinstance(cmd, _Call):
            self._calls.append(cmd)
            if cmd.abort:
                self._abort(list(self.engine.requests))
        elif isinstance(cmd, _Add):
            if self._calls:
                self._held.append(cmd)
            else:
                self._admit(cmd)
        else:
            _, ids = cmd
            gone = set(ids)            # a held submission whose caller left: never admitted
            for add in [a for a in self._held if gone & set(a.stream.request_ids)]:
                self._held.remove(add)
                _resolve(add.loop, add.admitted, error=EngineError("aborted"))
            self._abort(ids)

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            out = self.engine.abort_request(rid)
            if out is not None:
                self._deliver([out])

    def _admit(self, cmd: _Add) -> None:
        try:
            reqs, many = [], len(cmd.items) > 1
            if len({it.request_id for it in cmd.items}) < len(cmd.items):
                raise ValueError("request ids within one submission must be distinct")
            for i, item in enumerate(cmd.items):
                try:
                    reqs.extend(self._make_requests(item))
                except ValueError as e:
                    raise ValueError(f"prompt {i}: {e}" if many else str(e)) from None
        except Exception as e:  # ValueError: bad input; anything else: a bug, still answered
            _resolve(cmd.loop, cmd.admitted, error=e)
            return
        for i, req in enumerate(reqs):
            self.engine.add(req, stream=True)
            self._routes[req.request_id] = _Route(cmd.stream, i, cmd.loop)
        _resolve(cmd.loop, cmd.admitted,
                 result=[list(r.prompt_token_ids) for r in reqs if r.index == 0])

    def _make_requests(self, item: GenerationItem):
        prompt, images = item.prompt, None
        if item.mm_inputs is not None:
            return self._checked(item, self.engine.make_requests(
                item.request_id, prompt, item.params, mm_inputs=item.mm_inputs))
        if isinstance(prompt, ChatPrompt):
            # images are decoded and preprocessed here, on the engine thread
            prompt, images = self.engine.chat_prompt(
                list(prompt.messages), prompt.add_generation_prompt, **dict(prompt.template_kwargs))
        return self._checked(item, self.engine.make_requests(item.request_id, prompt,
                                                             item.params, images))

    def _checked(self, item: GenerationItem, reqs: list):
        max_len, asked = self.config.model.max_model_len, item.params.max_tokens
        n = reqs[0].num_prompt_tokens
        if self.strict_max_tokens and asked is not None and n + asked > max_len:
            raise ValueError(
                f"this model's maximum context length is {max_len} tokens, but {n + asked} were "
                f"requested ({n} in the prompt and {asked} in max_tokens); reduce the prompt "
                f"or max_tokens")
        return reqs

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("engine step failed; failing the requests in flight")
            self._step_errors += 1
            self._fail_all(EngineError(f"the engine step failed: {e!r}"))
            return
        self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            route = self._routes.get(out.request_id)
            if route is None:
                continue
            if out.finished:
                del self._routes[out.request_id]
            out.metrics["output_time"] = now     # when the token existed, for ITL metrics
            batches.setdefault(route.loop, []).append((route.stream.outputs, (route.index, out)))
        for loop, items in batches.items():
            self._post(loop, items)

    def _fail_all(self, error: EngineError) -> None:
        for rid in list(self.engine.requests):
            try:
                self.engine.abort_request(rid)
            except Exception:   # the engine may be inconsistent after a failed step
                logger.exception("abort of %s failed", rid)
                self.engine.requests.pop(rid, None)
        batches: dict[asyncio.AbstractEventLoop, dict] = {}
        for route in self._routes.values():     # one error per stream is enough
            batches.setdefault(route.loop, {})[id(route.stream)] = (route.stream.outputs, error)
        self._routes.clear()
        for loop, items in batches.items():
            self._post(loop, list(items.values()))

    def _post(self, loop: asyncio.AbstractEventLoop, items: list) -> None:
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # that event loop is closed: nobody is listening any more
            dead = [rid for rid, r in self._routes.items() if r.loop is loop]
            for rid in dead:
                del self._routes[rid]
                self.engine.abort_request(rid)

    def _publish(self) -> None:
        e = self.engine
        stats, kv, disp, enc = e.stats, e.kv, e.runner.dispatcher, e.runner.encoder_graphs
        self.snapshot = EngineSnapshot(
            num_running=len(e.scheduler.running), num_waiting=len(e.scheduler.waiting),
            kv_usage=kv.usage, num_free_blocks=kv.pool.num_free, num_blocks=kv.num_usable_blocks,
            prompt_tokens=stats.prompt_tokens, prefilled_tokens=stats.prefilled_tokens,
            generation_tokens=stats.generation_tokens,
            steps=stats.steps, finished_requests=stats.finished_requests,
            stopped_requests=stats.stopped_requests, aborted_requests=stats.aborted_requests,
            num_graph_steps=disp.num_graph_steps,
            num_eager_fallbacks=disp.num_eager_fallbacks,
            num_encoder_graph_replays=enc.num_graph_replays if enc is not None else 0,
            num_encoder_eager_images=enc.num_eager_fallbacks if enc is not None else 0,
            num_preemptions=e.scheduler.num_preemptions, prefix_queries=kv.prefix_queries,
            prefix_hits=kv.prefix_hits, step_errors=self._step_errors,
            spec_num_drafts=stats.spec_num_drafts,
            spec_num_draft_tokens=stats.spec_num_draft_tokens,
            spec_num_accepted_tokens=stats.spec_num_accepted_tokens)


def _put_all(items: list) -> None:
    for q, item in items:
        q.put_nowait(item)


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, result=None,
             error: BaseException | None = None) -> None:
    def settle() -> None:
        if fut.done():      # the caller was cancelled
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass
