"""The MoE block (fullgraph/layers/moe) on CPU against transformers' Qwen3-Next and
Qwen3.5-MoE sparse MoE blocks, and its checkpoint loading in both expert layouts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fullgraph.layers.moe import SparseMoeBlock, experts_reference, route, sort_by_expert

H, E, TOP_K, I, S = 64, 8, 3, 24, 40      # hidden, experts, top-k, expert and shared widths


def hf_config(kind: str, norm_topk_prob: bool = True, **extra):
    common = dict(vocab_size=128, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_experts=E, num_experts_per_tok=TOP_K,
                  moe_intermediate_size=I, shared_expert_intermediate_size=S,
                  linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                  linear_value_head_dim=16, **extra)
    if kind == "qwen3_next":
        from transformers import Qwen3NextConfig
        cfg = Qwen3NextConfig(intermediate_size=96, norm_topk_prob=norm_topk_prob, **common)
    else:
        from transformers import Qwen3_5MoeTextConfig
        cfg = Qwen3_5MoeTextConfig(**common)
    cfg._experts_implementation = "eager"      # transformers' loop over experts
    return cfg


def hf_block(kind: str, cfg, seed: int = 0) -> torch.nn.Module:
    if kind == "qwen3_next":
        from transformers.models.qwen3_next.modeling_qwen3_next import (
            Qwen3NextSparseMoeBlock as Block)
    else:
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import (
            Qwen3_5MoeSparseMoeBlock as Block)
    block = Block(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():          # transformers zeroes the router: ties everywhere
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return block.eval()


def ours_like(hf: torch.nn.Module, cfg) -> SparseMoeBlock:
    ours = SparseMoeBlock.from_config(cfg)
    ours.load_state_dict(hf.state_dict())      # strict: every name matches
    return ours


CASES = [("qwen3_next", True), ("qwen3_next", False), ("qwen3_5_moe", True)]


@pytest.mark.parametrize("kind, norm", CASES)
@pytest.mark.parametrize("t", [1, 2, 7, 64])
def test_matches_transformers_float32(kind, norm, t):
    cfg = hf_config(kind, norm)
    hf = hf_block(kind, cfg, seed=t)
    ours = ours_like(hf, cfg)
    assert ours.norm_topk_prob == norm
    x = torch.randn(t, H, generator=torch.Generator().manual_seed(100 + t))
    with torch.no_grad():
        ref = hf(x[None])[0]
        out = ours(x)
    assert out.shape == (t, H) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_matches_transformers_bfloat16():
    # seeded: about 1 input in 40 puts two router logits within bf16 rounding of each other,
    # and the two implementations then pick different experts
    torch.manual_seed(0)
    cfg = hf_config("qwen3_next")
    hf = hf_block("qwen3_next", cfg).to(torch.bfloat16)
    ours = ours_like(hf, cfg).to(torch.bfloat16)
    x = torch.randn(32, H).to(torch.bfloat16)
    with torch.no_grad():
        ref, out = hf(x[None])[0], ours(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_route_and_sort():
    logits = torch.randn(5, E)
    w, ids = route(logits, TOP_K, normalize=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    assert (ids == logits.topk(TOP_K).indices).all()
    w, _ = route(logits, TOP_K, normalize=False)
    torch.testing.assert_close(w, logits.softmax(-1).topk(TOP_K).values)
    ids = torch.tensor([[3, 0], [3, 5], [0, 3]])
    perm, offsets = sort_by_expert(ids, E)
    assert perm.tolist() == [1, 4, 0, 2, 5, 3]         # by expert, token order within one
    assert offsets.tolist() == [0, 2, 2, 2, 5, 5, 6, 6, 6]


def test_reference_is_the_weighted_sum_of_experts():
    """Against the definition, with one expert taking every token (an empty rest)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, H, generator=g)
    gu = torch.randn(E, 2 * I, H, generator=g) * H ** -0.5
    dn = torch.randn(E, H, I, generator=g) * I ** -0.5
    ids = torch.tensor([[5, 1], [5, 2], [5, 7], [5, 1], [5, 0], [5, 7]])
    w = torch.rand(6, 2, generator=g)
    out = experts_reference(x, w, ids, gu, dn)
    for t in range(6):
        want = sum(w[t, j] * dn[e] @ (F.silu(gu[e, :I] @ x[t]) * (gu[e, I:] @ x[t]))
                   for j, e in enumerate(ids[t].tolist()))
        torch.testing.assert_close(out[t], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["qwen3_next", "qwen3_5_moe"])
def test_loads_save_pretrained_checkpoint(kind, tmp_path):
    """save_pretrained writes one tensor per expert (experts.{e}.*_proj.weight)."""
    from safetensors.torch import load_file
    if kind == "qwen3_next":
        from transformers import Qwen3NextForCausalLM as Model
    else:
        from transformers import Qwen3_5MoeForCausalLM as Model
    cfg = hf_config(kind)
    torch.manual_seed(0)
    model = Model(cfg).eval()
    with torch.no_grad():
        for p in model.model.layers[0].mlp.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(tmp_path)
    tensors = {}
    for f in tmp_path.glob("*.safetensors"):
        tensors.update(load_file(f))
    prefix = "model.layers.0.mlp."
    names = [n[len(prefix):] for n in tensors if n.startswith(prefix)]
    assert "experts.0.gate_proj.weight" in names and "experts.gate_up_proj" not in names
    ours = SparseMoeBlock.from_config(cfg)
    for p in ours.parameters():
        torch.nn.init.constant_(p, float("nan"))
    for name in names:
        assert ours.load_weight(name, tensors[prefix + name]), name
        assert ours.load_expert_weight(name, tensors[prefix + name]) == name.startswith("experts.")
    assert not any(p.isnan().any() for p in ours.parameters())      # every slice written
    x = torch.randn(9, H)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model.model.layers[0].mlp(x[None])[0],
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("split_gate_up", [False, True])
def test_loads_fused_expert_tensors(split_gate_up):
    """Qwen3.5-MoE checkpoints: experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]
    (some checkpoints split gate/up into experts.gate_proj / experts.up_proj [E, I, H])."""
    cfg = hf_config("qwen3_5_moe")
    hf = hf_block("qwen3_5_moe", cfg, seed=3)
    ours = SparseMoeBlock.from_config(cfg)
    for name, t in hf.state_dict().items():
        if split_gate_up and name == "experts.gate_up_proj":
            assert ours.load_expert_weight("experts.gate_proj", t[:, :I])
            assert ours.load_expert_weight("experts.up_proj", t[:, I:])
        else:
            assert ours.load_weight(name, t)
    x = torch.randn(4, H)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x[None])[0], rtol=1e-6, atol=1e-6)


def test_load_expert_weight_checks_names_and_shapes():
    ours = SparseMoeBlock(H, E, TOP_K, I, S)
    assert not ours.load_expert_weight("gate.weight", torch.zeros(E, H))
    assert not ours.load_expert_weight("experts.0.gate_proj.bias", torch.zeros(I))
    assert not ours.load_weight("experts.0.bogus.weight", torch.zeros(I, H))
    with pytest.raises(ValueError, match="shape"):
        ours.load_expert_weight("experts.1.up_proj.weight", torch.zeros(H, I))
    with pytest.raises(ValueError, match="shape"):
        ours.load_expert_weight("experts.gate_up_proj", torch.zeros(E, I, H))
    with pytest.raises(ValueError, match="expert 8 of 8"):
        ours.load_expert_weight("experts.8.down_proj.weight", torch.zeros(H, I))
    with pytest.raises(ValueError, match="shape"):
        ours.load_weight("shared_expert_gate.weight", torch.zeros(H))
    up = torch.randn(I, H)
    assert ours.load_expert_weight("experts.2.up_proj.weight", up)
    assert torch.equal(ours.experts.gate_up_proj[2, I:], up)


def test_without_shared_expert():
    ours = SparseMoeBlock(H, E, TOP_K, I, shared_expert_intermediate_size=0)
    assert ours.shared_expert is None
    assert {n for n, _ in ours.named_parameters()} == {"gate.weight", "experts.gate_up_proj",
                                                        "experts.down_proj"}
    for p in ours.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    x = torch.randn(5, H)
    with torch.no_grad():
        w, ids = route(x @ ours.gate.weight.t(), TOP_K, True)
        want = experts_reference(x, w, ids, ours.experts.gate_up_proj, ours.experts.down_proj)
        torch.testing.assert_close(ours(x), want)


def test_fake_graph_replays_new_routing():
    """Captured once (CPU fake graph), replayed on new inputs that route elsewhere."""
    from fullgraph.worker.cudagraph.fake import FakeGraphRuntime
    cfg = hf_config("qwen3_next")
    hf = hf_block("qwen3_next", cfg)
    ours = ours_like(hf, cfg)
    x = torch.randn(6, H)
    rt = FakeGraphRuntime()
    with torch.no_grad():
        graph, out = rt.capture(lambda: ours(x))
        ids0 = route(x @ ours.gate.weight.t(), TOP_K, True)[1]
        for seed in range(3):
            x.copy_(torch.randn(6, H, generator=torch.Generator().manual_seed(seed)))
            rt.replay(graph)
            assert not torch.equal(route(x @ ours.gate.weight.t(), TOP_K, True)[1], ids0)
            torch.testing.assert_close(out, hf(x[None])[0], rtol=1e-6, atol=1e-6)


def test_compiles_as_one_opaque_op():
    cfg = hf_config("qwen3_next")
    ours = ours_like(hf_block("qwen3_next", cfg), cfg)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for t in (3, 17):
            x = torch.randn(t, H)
            torch.testing.assert_close(compiled(x), ours(x))
