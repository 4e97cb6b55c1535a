"""`fullgraph bench serve`: a load generator for a running OpenAI-compatible server.

Sends `--num-prompts` streamed /v1/completions requests of random token ids (`--input-len`
each, `--output-len` tokens out with ignore_eos, so every request has the asked-for shape),
either `--concurrency` at a time or arriving as a Poisson process at `--request-rate` per
second (both may be given). Reports time to first token, inter-token latency, time per
output token and end-to-end latency percentiles and throughput; writes bench_serve.json and
bench_serve.png to `--out`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import time
import logging
from dataclasses import asdict, dataclass, field

import httpx
from tqdm import tqdm


@dataclass(slots=True)
class RequestResult:
    ok: bool = False
    error: str | None = None
    start: float = 0.0                 # seconds since the benchmark began
    ttft: float | None = None
    e2e: float | None = None
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=None,
                   help="requests in flight at most (default: no limit)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrival rate, requests/s (default: all at once)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--token-id-range", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="random prompt token ids are drawn from [LO, HI) (default: [10, the "
                        "vocab_size the server's /v1/models reports, else 1000))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--out", default=".", help="directory for bench_serve.json and .png")


def _check(ns: argparse.Namespace) -> None:
    if ns.num_prompts < 1 or ns.input_len < 1 or ns.output_len < 1:
        raise ValueError("--num-prompts, --input-len and --output-len must be >= 1")
    if ns.concurrency is not None and ns.concurrency < 1:
        raise ValueError("--concurrency must be >= 1")
    if not ns.request_rate > 0:
        raise ValueError("--request-rate must be > 0")
    if ns.token_id_range is not None and not 0 <= ns.token_id_range[0] < ns.token_id_range[1]:
        raise ValueError("--token-id-range needs 0 <= LO < HI")


async def _one(http: httpx.AsyncClient, body: dict, t0: float) -> RequestResult:
    res = RequestResult(start=time.perf_counter() - t0)
    start = last = time.perf_counter()
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error")
                    return res
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                for c in chunk.get("choices", []):
                    n = len(c.get("token_ids") or [])
                    if n == 0:
                        continue
                    now = time.perf_counter()
                    if res.ttft is None:
                        res.ttft = now - start
                    else:
                        res.itls.extend([(now - last) / n] * n)
                    last = now
                    res.output_tokens += n
        res.e2e = time.perf_counter() - start
        res.ok = res.ttft is not None
        if not res.ok:
            res.error = "no tokens received"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run(ns: argparse.Namespace) -> tuple[list[RequestResult], float, str]:
    rng = random.Random(ns.seed)
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    limits = httpx.Limits(max_connections=max(ns.concurrency or ns.num_prompts, 10))
    async with httpx.AsyncClient(base_url=ns.base_url.rstrip("/"), headers=headers,
                                 limits=limits, timeout=ns.timeout) as http:
        try:
            r = await http.get("/v1/models")
            r.raise_for_status()
            card = r.json()["data"][0]
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
            raise ValueError(f"cannot list the models of {ns.base_url}: {e!r}") from None
        model = ns.model or card["id"]
        lo, hi = ns.token_id_range or (10, card.get("vocab_size") or 1000)
        prompts = [[rng.randrange(lo, hi) for _ in range(ns.input_len)]
                   for _ in range(ns.num_prompts)]
        sem = asyncio.Semaphore(ns.concurrency or ns.num_prompts)
        bar = tqdm(total=ns.num_prompts, desc="bench serve", unit="req")

        async def limited(prompt: list[int], t0: float) -> RequestResult:
            async with sem:
                body = {"model": model, "prompt": prompt, "max_tokens": ns.output_len,
                        "temperature": 0.0, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}, "return_token_ids": True}
                res = await _one(http, body, t0)
            bar.update(1)
            return res

        t0 = time.perf_counter()
        tasks = []
        for i, prompt in enumerate(prompts):
            if i and math.isfinite(ns.request_rate):
                await asyncio.sleep(rng.expovariate(ns.request_rate))
            tasks.append(asyncio.create_task(limited(prompt, t0)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
    return results, duration, model


def _stats(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {k: float("nan") for k in ("mean", "p50", "p90", "p99", "min", "max")}
    s = sorted(xs)

    def pct(q: float) -> float:     # nearest-rank percentile
        return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]
    return {"mean": statistics.fmean(s), "p50": pct(50), "p90": pct(90), "p99": pct(99),
            "min": s[0], "max": s[-1]}


def summarize(ns: argparse.Namespace, results: list[RequestResult], duration: float,
              model: str) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or ns.input_len for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "base_url": ns.base_url, "model": model, "num_prompts": ns.num_prompts,
        "concurrency": ns.concurrency,
        "request_rate": None if math.isinf(ns.request_rate) else ns.request_rate,
        "input_len": ns.input_len, "output_len": ns.output_len, "seed": ns.seed,
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": [r.error for r in results if not r.ok][:10],
        "duration_s": duration, "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput_req_s": len(ok) / duration,
        "output_throughput_tok_s": out_tokens / duration,
        "total_token_throughput_tok_s": (in_tokens + out_tokens) / duration,
        "ttft_s": _stats([r.ttft for r in ok]), "itl_s": _stats([x for r in ok for x in r.itls]),
        "tpot_s": _stats(tpot), "e2e_s": _stats([r.e2e for r in ok]),
    }


def plot(report: dict, results: list[RequestResult], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].hist([r.ttft * 1e3 for r in ok], bins=30)
    axes[0].set(title="time to first token", xlabel="ms", ylabel="requests")
    axes[1].hist([x * 1e3 for r in ok for x in r.itls], bins=50)
    axes[1].set(title="inter-token latency", xlabel="ms", ylabel="tokens")
    for ax in axes[:2]:
        ax.set_yscale("log")     # keep rare stalls (compiles, preemptions) visible
    for i, r in enumerate(sorted(ok, key=lambda r: r.start)):
        axes[2].plot([r.start, r.start + r.ttft], [i, i], color="tab:orange")
        axes[2].plot([r.start + r.ttft, r.start + r.e2e], [i, i], color="tab:blue")
    axes[2].set(title="requests (orange: waiting for first token)", xlabel="s",
                ylabel="request")
    fig.suptitle(f"{report['model']}: {report['completed']} requests, "
                 f"{report['output_throughput_tok_s']:.1f} output tok/s, "
                 f"p50 TTFT {report['ttft_s']['p50'] * 1e3:.1f} ms, "
                 f"p50 ITL {report['itl_s']['p50'] * 1e3:.2f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(ns: argparse.Namespace) -> int:
    _check(ns)
    # httpx logs every request at INFO, which would scroll the progress bar away
    logging.getLogger("httpx").setLevel(logging.WARNING)
    results, duration, model = asyncio.run(run(ns))
    report = summarize(ns, results, duration, model)
    os.makedirs(ns.out, exist_ok=True)
    json_path = os.path.join(ns.out, "bench_serve.json")
    with open(json_path, "w") as f:
        json.dump({**report, "requests": [asdict(r) for r in results]}, f, indent=2)
    plot(report, results, os.path.join(ns.out, "bench_serve.png"))
    print(f"{report['completed']}/{ns.num_prompts} requests in {duration:.2f} s: "
          f"{report['request_throughput_req_s']:.2f} req/s, "
          f"{report['output_throughput_tok_s']:.1f} output tok/s")
    for key, name in [("ttft_s", "TTFT"), ("itl_s", "ITL"), ("tpot_s", "TPOT"),
                      ("e2e_s", "E2E")]:
        s = report[key]
        print(f"  {name:5s} ms: mean {s['mean'] * 1e3:8.2f}  p50 {s['p50'] * 1e3:8.2f}  "
              f"p90 {s['p90'] * 1e3:8.2f}  p99 {s['p99'] * 1e3:8.2f}")
    for err in report["errors"]:
        print(f"  error: {err}")
    print(f"wrote {json_path} and bench_serve.png")
    return 0 if report["failed"] == 0 else 1
