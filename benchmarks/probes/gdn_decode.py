"""A hybrid layer's decode kernels alone (layers/gdn/fused_decode.py, layers/gated_attention.py),
at Qwen3.5-0.8B's shapes, per batch size and kernel setting: µs per call from CUDA-graph
replays, against the bytes each call must move (state read + written, inputs, outputs). The
rule's kernel also at other state blocks and warps (`--rule-tiles 32x4 64x8`: value
columns a pass x warps; the first is today's), and the one-row layout: the rule without its
norm, a head's columns spread over programs (`--split-tiles`: columns a program x warps),
then out_proj with the gated norm in its prologue, against rule+norm then a plain out_proj;
and in_proj with the conv in its epilogue against in_proj then the conv kernel.

    python benchmarks/probes/gdn_decode.py [--rows 1 8 32 128] [--iters 200]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

from graph_timing import replay_ms  # noqa: E402  (this folder, sys.path[0] when run)

from fullgraph.layers import gated_attention  # noqa: E402
from fullgraph.layers.gemv import GATED_NORM, RMS_NORM, gemv  # noqa: E402
from fullgraph.layers.gdn import fused_decode  # noqa: E402

H, HV, DK, DV, KSIZE = 16, 16, 128, 128, 4          # Qwen3.5-0.8B's GDN layers
KEY_DIM, VALUE_DIM = H * DK, HV * DV
CONV_DIM = 2 * KEY_DIM + VALUE_DIM
HQ, HKV, D, ROT = 8, 2, 256, 64                     # its gated attention layers


def time_graph(fn, iters: int) -> float:
    """µs per replay."""
    return replay_ms(fn, iters) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--rule-tiles", nargs="+", default=["32x4", "64x8"])
    ap.add_argument("--split-tiles", nargs="+", default=["32x4", "16x2", "64x4"])
    args = ap.parse_args()
    rule_tiles = [tuple(map(int, t.split("x"))) for t in args.rule_tiles]
    split_tiles = [tuple(map(int, t.split("x"))) for t in args.split_tiles]
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    print(f"{torch.cuda.get_device_name()}  µs per call (graph replay); GB/s of the bytes moved")
    for r in args.rows:
        slots = torch.arange(1, r + 1, device=dev)
        init = torch.ones(r, dtype=torch.bool, device=dev)
        proj = torch.randn(r, CONV_DIM + VALUE_DIM + 2 * HV, device=dev, dtype=bf16)
        weight = torch.randn(CONV_DIM, KSIZE, device=dev, dtype=bf16)
        conv_pool = torch.randn(r + 1, KSIZE - 1, CONV_DIM, device=dev, dtype=bf16)
        rec_pool = torch.randn(r + 1, HV, DK, DV, device=dev) * 0.1
        qkv, z, b, a = proj.split((CONV_DIM, VALUE_DIM, HV, HV), dim=-1)
        a_log, dt_bias = torch.rand(HV, device=dev, dtype=bf16), torch.randn(HV, device=dev,
                                                                             dtype=bf16)
        norm_w = torch.ones(DV, device=dev, dtype=bf16)
        conv_out = fused_decode.conv_decode(qkv, weight, conv_pool, slots, init)
        t_conv = time_graph(lambda: fused_decode.conv_decode(qkv, weight, conv_pool, slots,
                                                             init), args.iters)
        t_rules = [time_graph(lambda bv=bv, w=w: fused_decode.gated_delta_decode(
            conv_out, z, b, a, a_log, dt_bias, norm_w, 1e-6, rec_pool, slots, init, H,
            v_block=bv, num_warps=w), args.iters) for bv, w in rule_tiles]
        t_rule = t_rules[0]
        state_bytes = 2 * r * HV * DK * DV * 4
        attn_qkv = torch.randn(r, (2 * HQ + 2 * HKV) * D, device=dev, dtype=bf16)
        cos = torch.randn(4096, ROT, device=dev)
        k_cache = torch.zeros(4096, HKV, D, device=dev, dtype=bf16)
        v_cache = torch.zeros_like(k_cache)
        pos = torch.arange(r, device=dev) * 7
        qn, kn = torch.ones(D, device=dev), torch.ones(D, device=dev)
        t_qk = time_graph(lambda: gated_attention.qk_norm_rope_store_kv(
            attn_qkv, pos, cos, cos, qn, kn, 1e-6, HQ, HKV, ROT, k_cache, v_cache, pos),
            args.iters)
        o = torch.randn(r, HQ, D, device=dev, dtype=bf16)
        t_gate = time_graph(lambda: gated_attention.sigmoid_gate(o, attn_qkv, HQ), args.iters)
        others = "  ".join(f"{bv}x{w} {t:7.2f}" for (bv, w), t in zip(rule_tiles[1:], t_rules[1:]))
        print(f"rows {r:4d}: conv {t_conv:7.2f}  rule+norm {t_rule:7.2f} "
              f"({state_bytes / t_rule / 1e3:6.0f} GB/s of state; {others})  attn prologue "
              f"{t_qk:6.2f}  gate {t_gate:6.2f}")
        if r == 1:
            w_out = torch.randn(1024, VALUE_DIM, device=dev, dtype=bf16)   # out_proj
            t_plain = time_graph(lambda: gemv(fused_decode.gated_delta_decode(
                conv_out, z, b, a, a_log, dt_bias, norm_w, 1e-6, rec_pool, slots, init, H),
                w_out), args.iters)

            def split(bv: int, w: int) -> None:
                o = fused_decode.gated_delta_decode(conv_out, z, b, a, a_log, dt_bias, norm_w,
                                                    1e-6, rec_pool, slots, init, H, v_block=bv,
                                                    num_warps=w, norm=False)
                gemv(o, w_out, prologue=GATED_NORM, residual=z, norm_weight=norm_w, eps=1e-6,
                     group=DV)
            times = [time_graph(lambda bv=bv, w=w: split(bv, w), args.iters)
                     for bv, w in split_tiles]
            splits = "  ".join(f"{bv}x{w} {t:7.2f}" for (bv, w), t in zip(split_tiles, times))
            print(f"rows 1, rule + out_proj: rule+norm, plain out_proj {t_plain:7.2f}; "
                  f"split rule, gated-norm out_proj {splits}")
            hidden = torch.randn(2, 1, 1024, device=dev, dtype=bf16)
            w_in = torch.randn(proj.shape[1], 1024, device=dev, dtype=bf16)
            in_norm = torch.ones(1024, device=dev)         # zero-centered: float32 1 + w
            t_in = time_graph(lambda: fused_decode.conv_decode(gemv(
                hidden[0], w_in, prologue=RMS_NORM, residual=hidden[1], norm_weight=in_norm,
                eps=1e-6)[:, :CONV_DIM], weight, conv_pool, slots, init), args.iters)
            t_fused = time_graph(lambda: fused_decode.in_proj_conv(
                hidden[0], hidden[1], in_norm, 1e-6, w_in, weight, conv_pool, slots, init),
                args.iters)
            print(f"rows 1, in_proj + conv: two kernels {t_in:7.2f}; one {t_fused:7.2f}")


if __name__ == "__main__":
    main()
