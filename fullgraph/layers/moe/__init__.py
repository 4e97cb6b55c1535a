"""Mixture-of-experts MLP (Qwen3-Next, Qwen3.5-MoE), model-agnostic.

- block.py: `SparseMoeBlock`, transformers' parameter names, checkpoint loading in both
  expert layouts (`load_expert_weight`).
- routing.py: the router's top-k (transformers' math) and the device-side sort of
  (token, slot) pairs by expert.
- experts.py: `fullgraph::moe_experts`, the routed experts as one opaque op.
- grouped_gemm.py: its CUDA path, Triton grouped GEMMs with no host syncs and a grid fixed
  by the token count, so a CUDA graph replays it under any routing.
- reference.py: its torch path (CPU) and the kernels' reference.
"""
from fullgraph.layers.moe.block import SparseMoeBlock
from fullgraph.layers.moe.experts import moe_experts
from fullgraph.layers.moe.reference import experts_reference
from fullgraph.layers.moe.routing import route, sort_by_expert

__all__ = ["SparseMoeBlock", "experts_reference", "moe_experts", "route", "sort_by_expert"]
