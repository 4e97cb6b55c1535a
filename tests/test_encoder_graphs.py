"""Encoder CUDA graphs (worker/encoder_graphs.py) on CPU with FakeGraphRuntime: the vision
tower's packed forward equals its per-image forward, the packing rule, and graph replays of
random image mixes equal eager encoding, several replays per graph.

FakeGraphRuntime replays exactly the ops it recorded on the tensors they touched, so a graph
whose outputs follow new images proves its ops read those images only through the
persistent buffers. Float32 throughout; atol=rtol=1e-5 as in test_vision_tower.py (masked
attention over a padded budget sums in another order than one call per frame)."""
from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fullgraph.models.interface import GraphEncoder
from fullgraph.models.qwen3_vl_vision import PackedLayout, Qwen3VLVisionTower
from fullgraph.worker.cudagraph.fake import FakeGraphRuntime
from fullgraph.worker.encoder_graphs import (EncoderGraphManager, default_budgets,
                                             graph_encoder_of, max_image_rows, pack)

VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
              temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=48, in_channels=3,
              num_position_embeddings=16, hidden_act="gelu_pytorch_tanh")
PATCH_DIM = 3 * 2 * 4 * 4
CPU = torch.device("cpu")
TOL = dict(atol=1e-5, rtol=1e-5)


def tower(deepstack: bool) -> Qwen3VLVisionTower:
    torch.manual_seed(0)
    cfg = SimpleNamespace(**VISION, deepstack_visual_indexes=[0, 2] if deepstack else [])
    model = Qwen3VLVisionTower(cfg).eval()
    with torch.no_grad():        # norms and biases away from their 1/0 init, too
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["deepstack", "no-deepstack"])
def vit(request) -> Qwen3VLVisionTower:
    return tower(request.param)


def random_grids(rng: random.Random, n: int, max_side: int = 10) -> list[tuple[int, int, int]]:
    """Images of whole 2x2 merge blocks, some two-frame clips."""
    return [(rng.choice((1, 1, 1, 2)), 2 * rng.randint(1, max_side // 2),
             2 * rng.randint(1, max_side // 2)) for _ in range(n)]


def pixels(grids, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grids), PATCH_DIM, generator=g)


def per_image(vit, px, grids) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The reference: each image alone through the eager per-frame forward."""
    out, row = [], 0
    for g in grids:
        n = g[0] * g[1] * g[2]
        embeds, deep = vit(px[row:row + n], [g])
        out.append((embeds, torch.stack(deep) if deep else None))
        row += n
    return out


def assert_outputs_equal(got, want) -> None:
    assert len(got) == len(want)
    for (e, d), (e_ref, d_ref) in zip(got, want):
        torch.testing.assert_close(e, e_ref, **TOL)
        assert (d is None) == (d_ref is None)
        if d is not None:
            torch.testing.assert_close(d, d_ref, **TOL)


# ------------------------------------------------------------------ the packed forward
@pytest.mark.parametrize("seed", range(4))
def test_packed_forward_equals_per_image_forward(vit, seed):
    rng = random.Random(seed)
    grids = random_grids(rng, rng.randint(1, 5))
    px = pixels(grids, seed)
    n = px.shape[0]
    budget = n + 4 * rng.randint(0, 8)           # some padding, or none
    layout = PackedLayout.allocate(budget, CPU)
    vit.write_encoder_layout(layout, grids)
    # padding rows hold large junk: they must not reach a real row
    buf = torch.cat([px, 50 * torch.randn(budget - n, PATCH_DIM)])
    with torch.no_grad():
        out = vit.forward_packed(buf, layout)
        assert out[0].shape == (budget // 4, 48)
        assert_outputs_equal(vit.split_encoder_output(out, grids), per_image(vit, px, grids))


def test_layout_segments_and_padding(vit):
    layout = PackedLayout.allocate(24, CPU)
    vit.write_encoder_layout(layout, [(2, 2, 2), (1, 2, 4)])      # frames of 4, 4 and 8
    assert layout.segment_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 8 + [-1] * 8
    assert not layout.interp_weight[16:].any() and not layout.rotary_ids[16:].any()
    vit.write_encoder_layout(layout, [])                           # all padding again
    assert (layout.segment_ids == -1).all() and not layout.interp_weight.any()
    with pytest.raises(ValueError, match="do not fit"):
        vit.write_encoder_layout(layout, [(1, 4, 8)])


# ------------------------------------------------------------------ packing
def test_smallest_fitting_budget():
    assert pack([10], [16, 64, 256], 4).batches[0].budget == 16
    assert pack([16], [16, 64, 256], 4).batches[0].budget == 16
    assert pack([17], [256, 16, 64], 4).batches[0].budget == 64
    plan = pack([40, 20], [16, 64, 256], 4)                        # 60 rows together
    assert [(b.budget, b.items, b.rows) for b in plan.batches] == [(64, (0, 1), 60)]


def test_several_items_per_batch_up_to_the_limit():
    plan = pack([4] * 10, [16, 64], 3)
    assert [len(b.items) for b in plan.batches] == [3, 3, 3, 1]
    assert [b.budget for b in plan.batches] == [16, 16, 16, 16]
    plan = pack([4] * 10, [16, 64], 16)
    assert [(b.budget, b.rows) for b in plan.batches] == [(64, 40)]


def test_first_fit_decreasing_and_oversize_items_go_eager():
    plan = pack([10, 40, 300, 20, 30], [16, 64], 8)
    assert plan.eager == (2,)
    # largest first: 40 | 30 (70 > 64, a new batch) | 20 joins 40 | 10 joins 30
    assert [(b.budget, b.items, b.rows) for b in plan.batches] == [(64, (1, 3), 60),
                                                                    (64, (4, 0), 40)]


@pytest.mark.parametrize("seed", range(20))
def test_every_item_is_packed_once_within_limits(seed):
    rng = random.Random(seed)
    budgets = sorted(rng.sample([8, 16, 32, 64, 128], rng.randint(1, 4)))
    rows = [4 * rng.randint(1, 40) for _ in range(rng.randint(0, 12))]
    limit = rng.randint(1, 5)
    plan = pack(rows, budgets, limit)
    placed = [i for b in plan.batches for i in b.items] + list(plan.eager)
    assert sorted(placed) == list(range(len(rows)))
    assert all(rows[i] > budgets[-1] for i in plan.eager)
    for b in plan.batches:
        assert len(b.items) <= limit and b.rows == sum(rows[i] for i in b.items)
        assert b.budget == min(x for x in budgets if x >= b.rows)


def test_default_budgets(tmp_path):
    assert default_budgets(65536, 4) == (256, 512, 1024, 2048, 4096)      # capped
    assert default_budgets(65536, 4, max_budget=16384) == (1024, 2048, 4096, 8192, 16384)
    assert default_budgets(256, 4) == (16, 32, 64, 128, 256)
    assert default_budgets(100, 4) == (8, 16, 28, 52, 100)                # aligned
    assert max_image_rows(str(tmp_path)) is None
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        dict(patch_size=16, merge_size=2, max_pixels=256 * 256, min_pixels=32 * 32)))
    assert max_image_rows(str(tmp_path)) == 256


def test_graph_encoder_discovery_and_bad_budgets(vit):
    assert isinstance(vit, GraphEncoder)
    wrapper = nn.Module()
    wrapper.visual = vit
    assert graph_encoder_of(wrapper) is vit
    wrapper.other = tower(False)
    assert graph_encoder_of(wrapper) is None          # ambiguous: no graphs
    assert graph_encoder_of(nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match="multiples of 4"):
        EncoderGraphManager(vit, [16, 30], 4, FakeGraphRuntime(), CPU, torch.float32)


# ------------------------------------------------------------------ graphs
@pytest.fixture(scope="module")
def manager(vit) -> EncoderGraphManager:
    m = EncoderGraphManager(vit, [16, 48, 128], 3, FakeGraphRuntime(), CPU, torch.float32)
    m.capture()
    return m


def test_capture_warms_up_on_buffers_of_its_own(vit):
    allocated = []
    real = vit.allocate_encoder_layout

    def spy(budget, device):
        allocated.append((budget, real(budget, device)))
        return allocated[-1][1]
    runtime = FakeGraphRuntime()
    m = EncoderGraphManager(vit, [16, 48], 2, runtime, CPU, torch.float32)
    vit.allocate_encoder_layout = spy
    try:
        report = m.capture()
    finally:
        del vit.allocate_encoder_layout
    assert report.num_graphs == runtime.num_captures == 2
    assert [b for b, _ in allocated] == [48, 16, 48, 16]    # warmups, then captures
    captured = {b: layout for b, layout in allocated[2:]}
    assert all(m._inputs[b].layout is captured[b] for b in (16, 48))


@pytest.mark.parametrize("seed", range(6))
def test_replays_equal_eager_for_random_mixes(vit, manager, seed):
    rng = random.Random(100 + seed)
    grids = random_grids(rng, rng.randint(1, 7), max_side=12)
    px = pixels(grids, seed)
    replays, eager = manager.num_graph_replays, manager.num_eager_fallbacks
    out = manager.encode(px, grids)
    rows = [t * h * w for t, h, w in grids]
    plan = pack(rows, manager.budgets, manager.max_items_per_batch)
    assert manager.num_graph_replays - replays == len(plan.batches)
    assert manager.num_eager_fallbacks - eager == sum(n > 128 for n in rows)
    with torch.no_grad():
        assert_outputs_equal(out, per_image(vit, px, grids))


def test_one_graph_replayed_with_other_images(vit, manager):
    """The same budget-48 graph three times; earlier outputs survive later replays."""
    calls = [[(1, 4, 4), (1, 2, 8)], [(2, 2, 6)], [(1, 6, 2), (1, 2, 2), (1, 2, 4)]]
    results = []
    for seed, grids in enumerate(calls):
        assert [b.budget for b in pack([t * h * w for t, h, w in grids], manager.budgets,
                                       3).batches] == [48]
        px = pixels(grids, 200 + seed)
        results.append((manager.encode(px, grids), per_image(vit, px, grids)))
    with torch.no_grad():
        for got, want in results:
            assert_outputs_equal(got, want)


def test_oversize_image_runs_eagerly_and_order_is_kept(vit, manager):
    grids = [(1, 2, 2), (1, 12, 12), (1, 4, 2), (2, 2, 2)]      # 144 patches > 128
    px = pixels(grids, 7)
    eager = manager.num_eager_fallbacks
    out = manager.encode(px, grids)
    assert manager.num_eager_fallbacks == eager + 1
    assert [e.shape[0] for e, _ in out] == [1, 36, 2, 2]
    with torch.no_grad():
        assert_outputs_equal(out, per_image(vit, px, grids))
    with pytest.raises(ValueError, match="rows"):
        manager.encode(px[:-1], grids)


# ------------------------------------------------------------------ the runner
def test_engine_with_encoder_graphs_equals_eager(tmp_path):
    """LLM with fake graphs: images go through the captured budgets (derived from the
    preprocessor's max_pixels), tokens equal the eager engine's."""
    from fullgraph import LLM, SamplingParams
    from test_vl_engine import END, IMAGE, START, make_vl_checkpoint
    path = make_vl_checkpoint(str(tmp_path / "vl"))
    common = dict(max_model_len=256, max_num_seqs=4, num_gpu_blocks_override=64)
    graphs = LLM(path, cudagraph_runtime="fake", cudagraph_capture_sizes=[1, 2, 4], **common)
    runner = graphs.engine.runner
    assert runner.encoder_graphs is not None
    assert runner.encoder_graphs.budgets == (16, 32, 64, 128, 256)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for h, w in ((64, 64), (32, 96), (128, 64))]
    prompts = [{"prompt_token_ids": [1, 2, START, IMAGE, END, 3, START, IMAGE, END, 4],
                "multi_modal_data": {"image": imgs[:2]}},
               {"prompt_token_ids": [5, START, IMAGE, END, 6],
                "multi_modal_data": {"image": imgs[2]}}]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in graphs.generate(prompts, params, use_tqdm=False)]
    assert runner.encoder_graphs.num_graph_replays >= 2
    assert runner.encoder_graphs.num_eager_fallbacks == 0
    eager = LLM(path, **common)
    assert eager.engine.runner.encoder_graphs is None
    assert got == [o.outputs[0].token_ids for o in eager.generate(prompts, params,
                                                                  use_tqdm=False)]
