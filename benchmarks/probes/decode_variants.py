"""Probe: decode ms/step of kernel-parameter variants, measured in the model on one machine
(`bench latency`'s graph mode; one engine per variant, each run in a new process; the
variants' runs interleaved, so drift between runs hits them alike). `--in-process` builds
every engine in this process: ~30 s faster per run, but engines built one after another in
one process drift by up to 5% (docs/benchmarks.md, tenth session).

    python benchmarks/probes/decode_variants.py --batch-sizes 1 --repeats 2 \\
        base splits=8 fuse norm_tile=4,1024,4

A variant is `base` or `+`-joined edits:
  splits=N            decode attention KV splits at one request
  fuse                the fused q/k + attention kernel at one request too
  norm_tile=BN,BK,W   one-row GEMV tiles with the RMSNorm prologue (qkv, gate_up)
  silu_tile=BN,BK,W   one-row GEMV tiles with the SiLU prologue (down)
  plain_tile=BN,BK,W  one-row GEMV tiles without a prologue, N <= 2048 (o)
  big_tile=BN,BK,W    one-row GEMV tiles without a prologue, N >= 32768 (LM head)
  decode_warps=N      warps of both decode attention kernels (paged_decode.NUM_WARPS)
  decode_tile=N       KV tokens per loop iteration of both (paged_decode.TILE_TOKENS)
  decode_stages=N     Triton pipeline stages of paged_decode's KV loop at every split count
                      (paged_decode.pipeline_stages)
  l2=P:A,B@S/P:C | l2=none  L2 prefetch plan (Qwen3DecoderLayer.l2_prefetch_plan):
                      projection P prefetches A and the last share S of B's rows (default
                      all; "next.X": the next layer's X)
  copy_engine         step inputs and samples by copy-engine copies (pcie_copy.py off)
  no_dtoh             skip every step's copy of samples to the host (timing only: steps
                      return zeros)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import torch

from fullgraph import pcie_copy
from fullgraph.attention import flex
from fullgraph.attention import paged_decode as paged
from fullgraph.entrypoints.bench import latency
from fullgraph.entrypoints.bench.common import copy_bandwidth
from fullgraph.layers import gemv
from fullgraph.models.qwen3 import Qwen3DecoderLayer
from fullgraph.worker import model_runner

ORIGINAL = {"splits": paged.decode_splits, "fuse": flex.fuse_qk_norm_rope,
            "config": gemv.tiles, "NUM_WARPS": paged.NUM_WARPS,
            "TILE_TOKENS": paged.TILE_TOKENS, "stages": paged.pipeline_stages,
            "l2": Qwen3DecoderLayer.l2_prefetch_plan,
            "pcie": pcie_copy.supported, "dtoh": model_runner.to_host}


def apply(variant: str) -> None:
    paged.decode_splits, flex.fuse_qk_norm_rope = ORIGINAL["splits"], ORIGINAL["fuse"]
    gemv.tiles = ORIGINAL["config"]
    paged.NUM_WARPS, paged.TILE_TOKENS = ORIGINAL["NUM_WARPS"], ORIGINAL["TILE_TOKENS"]
    paged.pipeline_stages = ORIGINAL["stages"]
    Qwen3DecoderLayer.l2_prefetch_plan = ORIGINAL["l2"]
    model_runner.to_host = ORIGINAL["dtoh"]
    pcie_copy.supported = ORIGINAL["pcie"]
    tiles: dict[int, tuple[int, int, int]] = {}
    plain: tuple[int, int, int] | None = None
    big: tuple[int, int, int] | None = None
    for edit in variant.split("+"):
        name, _, value = edit.partition("=")
        if name == "base":
            continue
        if name == "splits":
            n = int(value)
            paged.decode_splits = (lambda rows, hkv, sms, n=n:
                                   n if rows == 1 else ORIGINAL["splits"](rows, hkv, sms))
        elif name == "decode_warps":
            paged.NUM_WARPS = int(value)
        elif name == "decode_tile":
            paged.TILE_TOKENS = int(value)
        elif name == "decode_stages":
            paged.pipeline_stages = lambda num_splits, n=int(value): n
        elif name == "l2":
            Qwen3DecoderLayer.l2_prefetch_plan = {} if value == "none" else {
                proj: tuple((name, float(share or 1)) for name, _, share in
                            (t.partition("@") for t in targets.split(",")))
                for proj, _, targets in (part.partition(":") for part in value.split("/"))}
        elif name == "copy_engine":
            pcie_copy.supported = lambda device: False
        elif name == "no_dtoh":
            model_runner.to_host = lambda t, out=None: None if t is None else torch.zeros(
                t.shape, dtype=t.dtype)
        elif name == "fuse":
            flex.fuse_qk_norm_rope = lambda num_reqs, num_splits: num_splits > 1
        elif name in ("norm_tile", "silu_tile", "plain_tile", "big_tile"):
            tile = tuple(int(v) for v in value.split(","))
            if name == "plain_tile":
                plain = tile
            elif name == "big_tile":
                big = tile
            else:
                tiles[gemv.RMS_NORM if name == "norm_tile" else gemv.SILU_MUL] = tile
        else:
            raise SystemExit(f"unknown edit {edit!r}")

    def config(m_bucket, n, k, prologue=gemv.PLAIN):
        if m_bucket == 1 and prologue in tiles:
            return tiles[prologue]
        if m_bucket == 1 and prologue == gemv.PLAIN and plain and n <= 2048:
            return plain
        if m_bucket == 1 and prologue == gemv.PLAIN and big and n >= 32768:
            return big
        return ORIGINAL["config"](m_bucket, n, k, prologue)
    gemv.tiles = config


def run_fresh(variant: str, argv: list[str]) -> list[float]:
    """One run of `variant` in a new process, which inherits no drift: engines built one
    after another in one process drift (a later one decoded up to 5% slower at batch 1 on
    an H100)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, __file__, *argv, "--in-process", "--repeats", "1",
                        "--json", f.name, variant], check=True)
        return json.load(open(f.name))["results"][variant][0]


def main() -> None:
    p = argparse.ArgumentParser()
    latency.add_args(p)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--in-process", action="store_true",
                   help="every engine in this process (faster; later engines drift)")
    p.add_argument("--json")
    p.add_argument("variants", nargs="+")
    ns = p.parse_args()
    child_argv = [a for a in sys.argv[1:] if a not in ns.variants]
    ns.cudagraph_capture_sizes = [[b] for b in ns.batch_sizes]
    ns.cudagraph_mode = "full_decode_only"
    bandwidth = copy_bandwidth(torch.device("cuda")) if ns.in_process else None
    results: dict[str, list[list[float]]] = {v: [] for v in ns.variants}
    for rep in range(ns.repeats):
        for v in ns.variants:
            if not ns.in_process:
                ms = run_fresh(v, strip_option(child_argv, "--repeats", "--json"))
                results[v].append(ms)
                print(f"rep {rep} {v:40s} " + " ".join(f"{m:.3f}" for m in ms), flush=True)
                continue
            apply(v)
            run = latency.run_mode(ns, "graph", bandwidth)
            ms = [r["decode_ms_median"] for r in run["rows"]]
            results[v].append(ms)
            prep = [r["prepare_us_per_step"] for r in run["rows"]]
            print(f"rep {rep} {v:40s} " + " ".join(f"{m:.3f}" for m in ms)
                  + "  (prepare µs " + " ".join(f"{p:.1f}" for p in prep) + ")", flush=True)
    print(f"\nms/step, best of {ns.repeats} (batch {' '.join(map(str, ns.batch_sizes))}):")
    for v, runs in results.items():
        print(f"  {v:40s} " + " ".join(f"{min(col):.3f}" for col in zip(*runs)))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"batch_sizes": ns.batch_sizes, "results": results,
                       "argv": sys.argv[1:]}, f, indent=1)


def strip_option(argv: list[str], *names: str) -> list[str]:
    """argv without the options `names` and their values."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        else:
            out.append(a)
    return out


if __name__ == "__main__":
    main()
