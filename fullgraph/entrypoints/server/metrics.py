"""Prometheus metrics for /metrics, named like vLLM's (`fullgraph:` instead of `vllm:`).

Engine gauges and counters are read from the snapshot the engine thread publishes after
every step (a collector, so they are exact at scrape time and never touch the live engine).
Latency histograms are observed here, per request, from the outputs the server receives;
they use the engine's own timestamps, not the time an output reached the event loop.
Each app gets its own registry: no module-global state, several servers per process work.

`request_success_total{finished_reason}`: the engine's counts (`stop`, `length`: the
finished requests not stopped, `abort`), so a request that finished as its client left is
counted too.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fullgraph.engine.stats import EngineSnapshot
from fullgraph.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# a finished request's phases (vLLM's): (name, help, start, end) of RequestOutput.metrics
_PHASES = [
    ("request_queue_time_seconds", "Time from arrival to first being scheduled.",
     "arrival_time", "first_scheduled_time"),
    ("request_prefill_time_seconds", "Time from first being scheduled to the first token.",
     "first_scheduled_time", "first_token_time"),
    ("request_decode_time_seconds", "Time from the first token to the last.",
     "first_token_time", "last_token_time"),
    ("request_inference_time_seconds", "Time from first being scheduled to the last token.",
     "first_scheduled_time", "last_token_time"),
]


def token_buckets(max_model_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50 ... up to max_model_len (vLLM's token-count buckets)."""
    buckets, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_model_len:
                return buckets
            buckets.append(m * scale)
        scale *= 10

# (name, help, snapshot field)
_GAUGES = [
    ("num_requests_running", "Requests in the running batch.", "num_running"),
    ("num_requests_waiting", "Requests waiting to be scheduled.", "num_waiting"),
    ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", "kv_usage"),
    ("num_free_blocks", "KV-cache blocks free (cached-but-unused blocks count as free).",
     "num_free_blocks"),
    ("num_blocks", "Usable KV-cache blocks.", "num_blocks"),
]
_COUNTERS = [
    ("prompt_tokens", "Prompt tokens admitted.", "prompt_tokens"),
    ("generation_tokens", "Tokens generated.", "generation_tokens"),
    ("engine_steps", "Engine steps run.", "steps"),
    ("request_finished", "Requests that finished (stop or length).", "finished_requests"),
    ("request_aborted", "Requests aborted (e.g. the client disconnected).", "aborted_requests"),
    ("cudagraph_replays", "Steps run by replaying a captured graph.", "num_graph_steps"),
    ("eager_fallbacks", "Steps run eagerly because no graph fits.", "num_eager_fallbacks"),
    ("encoder_cudagraph_replays", "Vision encoder graph replays (multimodal models).",
     "num_encoder_graph_replays"),
    ("encoder_eager_images", "Images encoded eagerly: larger than every encoder graph budget.",
     "num_encoder_eager_images"),
    ("num_preemptions", "Requests preempted (recomputed) for lack of KV blocks.",
     "num_preemptions"),
    ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_queries"),
    ("prefix_cache_hits", "Prompt tokens served from the prefix cache.", "prefix_hits"),
    ("engine_step_errors", "Engine steps that raised.", "step_errors"),
    ("spec_decode_num_drafts", "Speculative decoding: verified requests that had drafts.",
     "spec_num_drafts"),
    ("spec_decode_num_draft_tokens", "Speculative decoding: draft tokens verified.",
     "spec_num_draft_tokens"),
    ("spec_decode_num_accepted_tokens", "Speculative decoding: draft tokens accepted.",
     "spec_num_accepted_tokens"),
]


class _EngineCollector(Collector):
    def __init__(self, snapshot: Callable[[], EngineSnapshot], model: str) -> None:
        self.snapshot, self.model = snapshot, model

    def collect(self) -> Iterator:
        snap = self.snapshot()
        c = CounterMetricFamily("fullgraph:request_success", "Requests that ended, by reason.",
                                labels=["model_name", "finished_reason"])
        reasons = {"stop": snap.stopped_requests,
                   "length": snap.finished_requests - snap.stopped_requests,
                   "abort": snap.aborted_requests}
        for reason, count in reasons.items():
            c.add_metric([self.model, reason], float(count))
        yield c
        for name, doc, attr in _GAUGES:
            g = GaugeMetricFamily(f"fullgraph:{name}", doc, labels=["model_name"])
            g.add_metric([self.model], float(getattr(snap, attr)))
            yield g
        for name, doc, attr in _COUNTERS:
            c = CounterMetricFamily(f"fullgraph:{name}", doc, labels=["model_name"])
            c.add_metric([self.model], float(getattr(snap, attr)))
            yield c


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], EngineSnapshot], model: str,
                 max_model_len: int) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(snapshot, model))

        def histogram(name: str, doc: str, buckets=_LATENCY_BUCKETS):
            return Histogram(f"fullgraph:{name}", doc, ["model_name"], registry=self.registry,
                             buckets=buckets).labels(model)
        self.ttft = histogram("time_to_first_token_seconds",
                              "Time from arrival to the first generated token.")
        self.itl = histogram("inter_token_latency_seconds",
                             "Time between consecutive generated tokens of a request.")
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last token.")
        self.phases = [(histogram(name, doc), start, end) for name, doc, start, end in _PHASES]
        tokens = token_buckets(max_model_len)
        self.prompt_tokens = histogram("request_prompt_tokens",
                                       "Prompt tokens of a finished request.", tokens)
        self.generation_tokens = histogram("request_generation_tokens",
                                           "Tokens a finished request generated.", tokens)
        self.model = model

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self, num_requests: int) -> "RequestTracker":
        return RequestTracker(self, num_requests)


class RequestTracker:
    """Latency bookkeeping for the requests of one API call."""

    def __init__(self, metrics: ServerMetrics, n: int) -> None:
        self.m = metrics
        self.seen = [0] * n
        self.last: list[float | None] = [None] * n

    def observe(self, index: int, out: RequestOutput) -> None:
        m, times = self.m, out.metrics
        n = len(out.outputs[0].token_ids)
        t = times.get("output_time")
        if n > self.seen[index] and t is not None:
            if self.seen[index] == 0 and "first_token_time" in times:
                m.ttft.observe(times["first_token_time"] - times["arrival_time"])
            elif self.last[index] is not None:
                m.itl.observe((t - self.last[index]) / (n - self.seen[index]))
            self.seen[index], self.last[index] = n, t
        if out.finished and t is not None:
            m.e2e.observe(t - times["arrival_time"])
            for histogram, start, end in m.phases:
                if start in times and end in times:
                    histogram.observe(times[end] - times[start])
            m.prompt_tokens.observe(len(out.prompt_token_ids))
            m.generation_tokens.observe(n)
