"""`fullgraph bench {latency,throughput,serve}`."""
from __future__ import annotations

import importlib

_BENCHES = {
    "latency": "decode ms/step and TTFT, eager vs CUDA graphs",
    "throughput": "offline output tokens/s on a mixed-length workload",
    "serve": "load generator for a running OpenAI-compatible server",
}


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (JSON + PNG)")
    kinds = bench.add_subparsers(dest="bench", required=True)
    for name, help_text in _BENCHES.items():
        module = importlib.import_module(f"fullgraph.entrypoints.bench.{name}")
        p = kinds.add_parser(name, help=help_text)
        module.add_args(p)
        p.set_defaults(func=module.main)
