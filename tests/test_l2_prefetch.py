"""The L2 prefetch hint's argument checks (CPU: no kernel runs)."""
from __future__ import annotations

import pytest
import torch

from fullgraph.layers import l2_prefetch


def test_regions_pad_unused_slots_with_zero_bytes():
    w = torch.empty(4, 8, dtype=torch.bfloat16)
    a = torch.empty(10, dtype=torch.bfloat16)
    args, n = l2_prefetch.regions([a], w)
    assert n == 1 and args[0] is a and args[1] == 20 and args[2] is w and args[3] == 0
    args, n = l2_prefetch.regions((), w)
    assert n == 0 and args[1] == 0 and args[3] == 0


def test_regions_reject_what_the_kernel_cannot_prefetch():
    w = torch.empty(4, 8)
    with pytest.raises(ValueError, match="at most 2"):
        l2_prefetch.regions([w, w, w], w)
    with pytest.raises(ValueError, match="contiguous"):
        l2_prefetch.regions([w.t()], w)


def test_layer_resolves_its_prefetch_plan_to_weights(monkeypatch):
    from transformers import Qwen3Config

    from fullgraph.layers.rotary import RotaryEmbedding
    from fullgraph.models.qwen3 import Qwen3DecoderLayer
    cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, num_hidden_layers=2)
    rotary = RotaryEmbedding(16, 64, 10000.0)
    first, last = Qwen3DecoderLayer(cfg, rotary), Qwen3DecoderLayer(cfg, rotary)
    monkeypatch.setattr(Qwen3DecoderLayer, "l2_prefetch_plan",
                        {"o_proj": (("gate_up_proj", 1.0), ("down_proj", 0.25)),
                         "down_proj": (("next.qkv_proj", 1.0),)})
    targets = first.l2_targets(last)
    gate_up, down = first.mlp.gate_up_proj.weight, first.mlp.down_proj.weight
    assert targets["o_proj"][0].data_ptr() == gate_up.data_ptr()
    assert targets["o_proj"][0].shape == gate_up.shape
    # a share of the rows: the last ones, as a view
    assert targets["o_proj"][1].shape == (16, 128)
    assert targets["o_proj"][1].data_ptr() == down[48:].data_ptr()
    assert targets["o_proj"][1].is_contiguous()
    qkv = last.self_attn.qkv_proj.weight
    assert targets["down_proj"][0].data_ptr() == qkv.data_ptr()
    assert targets["down_proj"][0].shape == qkv.shape
    assert last.l2_targets(None)["down_proj"] == ()      # the last layer has no next one
