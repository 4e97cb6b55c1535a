"""Qwen3-VL's model class (fullgraph/models/qwen3_vl.py, layers/mrope.py) against transformers'
Qwen3VLForConditionalGeneration on a tiny random model, float32 on the CPU: the prompt's MRoPE
positions, the image encoder's outputs, and whole steps — a prefill with an image (embeddings
and deepstack at its rows) and a decode step captured in a (fake) graph and replayed with
other inputs — through the flex backend's CPU path, as the runner drives them.

Tolerance: the same operations in the same order but for the deepstack add (to the MLP output
rather than the summed hidden state) and SDPA's layouts: logits of magnitude up to ~3 moved by
~3e-6. Each mistake tried (height and width rows swapped, the temporal row for every frequency,
no rope_delta in decode, deepstack added a layer late or not at all) moved them by 0.18 or
more."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import one_request_inputs
from fullgraph.attention.backend import ForwardContext
from fullgraph.attention.flex import FlexAttentionBackend
from fullgraph.attention.metadata import AttentionSpec, PersistentInputs, StepAttentionInputs
from fullgraph.layers.mrope import frequency_rows
from fullgraph.models.qwen3_vl import Qwen3VLForConditionalGeneration
from fullgraph.multimodal.inputs import MultiModalStepInputs
from fullgraph.worker.cudagraph.fake import FakeGraphRuntime

VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
              temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
              num_position_embeddings=16, deepstack_visual_indexes=[0, 2])
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [4, 2, 2], "mrope_interleaved": True})
IMAGE, START, END = 100, 101, 102
PATCH_DIM = 3 * 2 * 4 * 4


@pytest.fixture(scope="module")
def models():
    from transformers import Qwen3VLConfig
    from transformers import Qwen3VLForConditionalGeneration as HFModel
    cfg = Qwen3VLConfig(vision_config=VISION, text_config=TEXT, image_token_id=IMAGE,
                        video_token_id=103, vision_start_token_id=START,
                        vision_end_token_id=END)
    torch.manual_seed(0)
    hf = HFModel(cfg).eval()
    with torch.no_grad():      # norms away from 1, biases from 0, weights large enough to matter
        for name, p in hf.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2 if "visual" in name
                      else 0.1)
    ours = Qwen3VLForConditionalGeneration(cfg, max_position=512).eval()
    ours.load_weights(hf.state_dict().items())
    return hf, ours


def image_tokens(grid) -> list[int]:
    t, h, w = grid
    return [START] + [IMAGE] * (t * h * w // 4) + [END]


def prompt(*parts) -> list[int]:
    """Text runs are ints (that many text tokens), images grids."""
    rng = np.random.default_rng(len(parts))
    ids = []
    for part in parts:
        ids += image_tokens(part) if isinstance(part, tuple) else list(rng.integers(0, 90, part))
    return [int(i) for i in ids]


def pixels(grids, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grids), PATCH_DIM, generator=g)


def hf_inputs(ids, grids) -> dict:
    ids = torch.tensor([ids])
    out = dict(input_ids=ids, mm_token_type_ids=(ids == IMAGE).int())
    if grids:
        out |= dict(image_grid_thw=torch.tensor(grids), pixel_values=pixels(grids))
    return out


# (prompt parts): text only; one image inside text; two images of other grids with text
# before, between and after; images back to back, one closing the prompt; a two-frame grid
PROMPTS = [(9,), (3, (1, 4, 6), 5), (2, (1, 6, 4), 3, (1, 2, 8), 4),
           ((1, 4, 4), (1, 2, 2), 3, (1, 8, 2)), (2, (2, 4, 4), 1)]


@pytest.mark.parametrize("parts", PROMPTS)
def test_rope_positions_match_transformers(models, parts):
    hf, ours = models
    ids, grids = prompt(*parts), [p for p in parts if isinstance(p, tuple)]
    inputs = hf_inputs(ids, grids)
    ref, ref_delta = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs.get("image_grid_thw"))
    positions, delta = ours.rope_positions(ids, grids)
    assert positions.dtype == np.int64 and positions.shape == (3, len(ids))
    np.testing.assert_array_equal(positions, ref[:, 0].numpy())
    assert delta == int(ref_delta)


def test_rope_positions_refuse_mismatched_image_tokens(models):
    _, ours = models
    ids = prompt(2, (1, 4, 4), 2)
    with pytest.raises(ValueError, match="fewer"):
        ours.rope_positions(ids, [(1, 4, 4), (1, 2, 2)])
    with pytest.raises(ValueError, match="need 4"):
        ours.rope_positions(ids + [IMAGE], [(1, 4, 4)])
    with pytest.raises(ValueError, match="consecutive"):      # two 1-token images
        ours.rope_positions(prompt(2, (1, 2, 2), 2, (1, 2, 2)), [(1, 2, 4)])


def test_frequency_rows_interleave_as_transformers():
    """t h w t h w ... while each section lasts, then t (Qwen3-VL's [24, 20, 20] of 64)."""
    rows = frequency_rows(64, (24, 20, 20)).tolist()
    assert rows[:6] == [0, 1, 2, 0, 1, 2] and rows[57:] == [0, 1, 2, 0, 0, 0, 0]
    assert [rows.count(a) for a in range(3)] == [24, 20, 20]


def test_encode_images_match_transformers(models):
    hf, ours = models
    grids = [(1, 4, 6), (1, 2, 2), (1, 8, 4)]
    px = pixels(grids)
    with torch.no_grad():
        ref = hf.model.get_image_features(px, image_grid_thw=torch.tensor(grids))
        out = ours.encode_images(px, grids)
    sizes = [t * h * w // 4 for t, h, w in grids]

    def per_image(x):      # transformers 5.17 leaves deepstack features unsplit
        return list(x) if isinstance(x, (tuple, list)) else list(x.split(sizes))
    ref_embeds = per_image(ref.pooler_output)
    ref_deep = [per_image(layer) for layer in ref.deepstack_features]
    assert len(out) == len(grids)
    for i, (embeds, deep) in enumerate(out):
        assert embeds.shape == (sizes[i], 64) and deep.shape == (2, sizes[i], 64)
        torch.testing.assert_close(embeds, ref_embeds[i], atol=1e-5, rtol=1e-5)
        for layer in range(2):
            torch.testing.assert_close(deep[layer], ref_deep[layer][i], atol=1e-5, rtol=1e-5)


class Steps:
    """One request's steps over persistent inputs, as the model runner keeps them (the rope
    positions [tokens, 3], handed to the model as a [3, tokens] view): a graph captured on
    one step replays another of the same shape."""
    BS, BLOCKS, MAX_TOKENS, MAX_BLOCKS = 4, 32, 64, 16

    def __init__(self, text) -> None:
        d = text.head_dim
        self.spec = AttentionSpec(text.num_hidden_layers, text.num_attention_heads,
                                  text.num_key_value_heads, d, self.BS, self.BLOCKS, 1,
                                  self.MAX_TOKENS, self.MAX_BLOCKS, torch.float32)
        self.bt = torch.zeros(2, self.MAX_BLOCKS, dtype=torch.int32)
        self.bt[0] = torch.arange(1, self.MAX_BLOCKS + 1)
        self.pos, self.slots, self.ids = (torch.zeros(self.MAX_TOKENS, dtype=torch.int64)
                                          for _ in range(3))
        self.rope = torch.zeros(self.MAX_TOKENS, 3, dtype=torch.int64)
        self.seq, self.qsl = torch.zeros(1, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
        self.backend = FlexAttentionBackend(self.spec, torch.device("cpu"),
                                            PersistentInputs(self.bt, self.pos))
        self.kv = [(torch.zeros(self.BLOCKS * self.BS, text.num_key_value_heads, d),
                    torch.zeros(self.BLOCKS * self.BS, text.num_key_value_heads, d))
                   for _ in range(text.num_hidden_layers)]

    def write(self, ids, start: int, rope: np.ndarray) -> StepAttentionInputs:
        """Tokens `ids` at positions start.. with rope positions [3, n], in place."""
        n = len(ids)
        p = torch.arange(start, start + n)
        self.ids[:n] = torch.tensor(ids)
        self.pos[:n] = p
        self.slots[:n] = self.bt[0, p // self.BS].long() * self.BS + p % self.BS
        self.rope[:n] = torch.from_numpy(rope.T)
        self.seq[0], self.qsl[1] = start + n, n
        return one_request_inputs(n, self.pos, self.slots, self.seq, self.qsl, self.bt)

    def forward_fn(self, model, inputs: StepAttentionInputs, images=()):
        """Host work and metadata now; returns the device part (what a graph captures)."""
        n = inputs.num_tokens
        self.backend.prepare(inputs)
        meta = self.backend.build(inputs)
        mm = MultiModalStepInputs(self.rope[:n].t(), *images)
        ctx = ForwardContext(self.backend, meta, self.kv, self.slots[:n], multimodal=mm)
        logits = torch.empty(n, model.config.text_config.vocab_size)

        def forward() -> torch.Tensor:
            self.backend.update(meta, inputs)
            return model.compute_logits(model(self.ids[:n], self.pos[:n], ctx), logits)
        return forward


def test_prefill_with_an_image_then_a_captured_decode_match_transformers(models):
    hf, ours = models
    grids = [(1, 4, 6)]              # 2x3 merged: the height and width rows differ
    ids = prompt(3, grids[0], 5)
    steps = Steps(ours.config.text_config)
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, grids)).logits[0]
        rope, delta = ours.rope_positions(ids, grids)
        assert delta == -3
        # prefill, eagerly: the image's rows take its embeddings and deepstack features
        (embeds, deep), = ours.encode_images(pixels(grids), grids)
        rows = torch.tensor([i for i, t in enumerate(ids) if t == IMAGE])
        prefill = steps.forward_fn(ours, steps.write(ids, 0, rope), (rows, embeds, deep))
        torch.testing.assert_close(prefill(), ref, atol=5e-5, rtol=5e-5)

        # decode, captured on other inputs (a text-only step must not read the device) and
        # replayed with the next token at position len + rope_delta on all three rows
        n, nxt = len(ids), 7
        graph, logits = FakeGraphRuntime().capture(
            steps.forward_fn(ours, steps.write([1], n, np.zeros((3, 1), np.int64))))
        steps.backend.prepare(steps.write([nxt], n, np.full((3, 1), n + delta)))
        FakeGraphRuntime().replay(graph)
        ref = hf(**hf_inputs(ids + [nxt], grids)).logits[0, -1]
        torch.testing.assert_close(logits[0], ref, atol=5e-5, rtol=5e-5)
