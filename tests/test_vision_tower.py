"""The vision tower (fullgraph/models/qwen3_vl_vision.py) against transformers' own, inside
tiny random Qwen3VLForConditionalGeneration and Qwen3_5ForConditionalGeneration models: our
weights come from the whole model's state dict, under the checkpoint's `model.visual.` names.

Tolerance: float32 throughout, and the same operations in the same order except the patch
embedding (one matmul here, a Conv3d there: the same products summed in another order) and
tensor layouts inside SDPA. That moves outputs of magnitude up to ~4 here by ~1.5e-6;
atol=rtol=1e-5 leaves room for that, while each mistake tried (all images in one attention
segment, rotary rows and columns swapped, interpolation taps reversed) moved them by 1e-2 or
more."""
from __future__ import annotations

import pytest
import torch

from fullgraph.models.qwen3_vl_vision import Qwen3VLVisionTower, visual_weight_name

VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
              temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=48,
              num_position_embeddings=16)         # a 4x4 learned position grid
TEXT = dict(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=24)
PATCH_DIM = 3 * 2 * 4 * 4
# grids smaller and larger than the position grid, non-square, and a two-frame clip
GRIDS = [[1, 2, 2], [1, 6, 4], [1, 8, 10], [2, 4, 6]]


def _hf_model(kind: str):
    from transformers import (Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration)
    torch.manual_seed(0)
    if kind == "qwen3_vl":
        cfg = Qwen3VLConfig(vision_config=dict(VISION, deepstack_visual_indexes=[0, 2]),
                            text_config=TEXT)
        model = Qwen3VLForConditionalGeneration(cfg)
    else:
        text = dict(TEXT, layer_types=["full_attention"], linear_num_key_heads=1,
                    linear_num_value_heads=1, linear_key_head_dim=8, linear_value_head_dim=8)
        cfg = Qwen3_5Config(vision_config=VISION, text_config=text)
        model = Qwen3_5ForConditionalGeneration(cfg)
    with torch.no_grad():       # norms and biases away from their 1/0 init, too
        for p in model.model.visual.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen3_5"])
def pair(request):
    hf = _hf_model(request.param)
    ours = Qwen3VLVisionTower(hf.config.vision_config).eval()
    ours.load_weights(hf.state_dict().items())
    return request.param, hf.model.visual, ours


def _pixels(grids: list[list[int]], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grids), PATCH_DIM, generator=g)


@pytest.mark.parametrize("grids", [GRIDS[2:3], GRIDS], ids=["one-image", "several"])
def test_matches_transformers(pair, grids):
    kind, hf, ours = pair
    pixels = _pixels(grids)
    with torch.no_grad():
        ref = hf(pixels, grid_thw=torch.tensor(grids))
        embeds, deepstack = ours(pixels, torch.tensor(grids))
    merged = sum(t * h * w for t, h, w in grids) // 4
    assert embeds.shape == (merged, 48)
    torch.testing.assert_close(embeds, ref.pooler_output, atol=1e-5, rtol=1e-5)
    expected = getattr(ref, "deepstack_features", None) or []
    assert len(deepstack) == len(expected) == (2 if kind == "qwen3_vl" else 0)
    for ours_layer, ref_layer in zip(deepstack, expected):
        assert ours_layer.shape == (merged, 48)
        torch.testing.assert_close(ours_layer, ref_layer, atol=1e-5, rtol=1e-5)


def test_images_attend_only_to_themselves(pair):
    """One call over several images = the images one at a time."""
    _, _, ours = pair
    pixels, rows, parts = _pixels(GRIDS), 0, []
    with torch.no_grad():
        together, _ = ours(pixels, GRIDS)
        for t, h, w in GRIDS:
            parts.append(ours(pixels[rows:rows + t * h * w], [[t, h, w]])[0])
            rows += t * h * w
    torch.testing.assert_close(together, torch.cat(parts), atol=1e-5, rtol=1e-5)


def test_checkpoint_names(pair):
    _, hf, ours = pair
    assert visual_weight_name("model.visual.blocks.0.attn.qkv.weight") == "blocks.0.attn.qkv.weight"
    assert visual_weight_name("visual.merger.linear_fc1.bias") == "merger.linear_fc1.bias"
    assert visual_weight_name("model.language_model.embed_tokens.weight") is None
    fresh = Qwen3VLVisionTower(hf.config)                   # legacy `visual.` names load too
    fresh.load_weights((f"visual.{n}", t) for n, t in hf.state_dict().items())
    assert torch.equal(fresh.pos_embed.weight, ours.pos_embed.weight)
    partial = [(f"model.visual.{n}", t) for n, t in hf.state_dict().items()
               if not n.startswith("merger.")]
    with pytest.raises(ValueError, match="missing weights.*merger"):
        Qwen3VLVisionTower(hf.config).load_weights(partial)


def test_bad_inputs(pair):
    _, _, ours = pair
    with pytest.raises(ValueError, match="host data"):
        ours(_pixels([[1, 2, 2]]), torch.tensor([[1, 2, 2]], device="meta"))
    with pytest.raises(ValueError, match="shape"):
        ours(_pixels([[1, 2, 2]]), [[1, 2, 4]])
    with pytest.raises(ValueError, match="merge blocks"):
        ours(_pixels([[1, 3, 2]]), [[1, 3, 2]])
