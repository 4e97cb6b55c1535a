"""The host Python of an eager decode layer's projections, on a machine without a GPU (issue
27): the GPU path's ops (layers/fused_linear.py, layers/gemv.py) on CPU tensors shaped like
Qwen3-0.6B's at batch 1, with the predicates that pick the GPU path forced on and every
Triton launch replaced by what our `Launcher` does before its C call (binding the arguments,
checking the launch hooks) or by nothing. What it measures is Python, allocations and
binding: on the GPU machine each launch's C call and the driver come on top.

    python benchmarks/probes/eager_python.py [--calls 20000] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from transformers import Qwen3Config

import fullgraph.layers.fused_linear as fused_linear
import fullgraph.layers.gemv as gemv_module
from fullgraph.layers import launch
from fullgraph.models.qwen3 import Qwen3DecoderLayer


def per_call_us(fn, calls: int) -> float:
    for _ in range(calls // 20):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def force_gpu_path(bind: bool) -> None:
    """The GPU path's predicates true on CPU tensors; launches bind (or do nothing)."""
    def launch_stub(self, grid, args, kwargs):
        if bind:
            launch.launch_hooks()
            launch.bind(args)

    launch.Launcher.launch = launch_stub
    for module in (fused_linear, gemv_module):
        module.pdl_enabled = lambda t: True
        module.gemv_supported = lambda x, w: True
    fused_linear._fusable = lambda x: True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    cfg = Qwen3Config(hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6)
    layer = Qwen3DecoderLayer(cfg, None).to(torch.bfloat16)
    x, residual = torch.zeros(2, 1, 1024, dtype=torch.bfloat16)
    attn_out = torch.zeros(1, 2048, dtype=torch.bfloat16)
    attn = layer.self_attn
    ops = {
        "qkv (norm_linear)": lambda: fused_linear.norm_linear(
            x, residual, layer.input_layernorm, attn.qkv_proj),
        "o_proj (gemv)": lambda: gemv_module.gemv(attn_out, attn.o_proj.weight),
        "mlp (norm_linear + silu_mul_linear)": lambda: layer.mlp(
            x, residual, layer.post_attention_layernorm, {}),
    }
    for bind in (False, True):
        force_gpu_path(bind)
        label = "launches bind their arguments" if bind else "launches do nothing"
        print(f"{label}: " + ", ".join(f"{name} {per_call_us(fn, a.calls):.2f} us"
                                        for name, fn in ops.items()))
    if a.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(a.calls // 4):
            for fn in ops.values():
                fn()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(16)


if __name__ == "__main__":
    main()
