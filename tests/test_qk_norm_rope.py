"""The fused q/k norm + RoPE + KV store op against transformers' Qwen3 functions, and its
store staying in place when compiled (CPU; the Triton kernel is in test_gpu_kernels.py)."""
from __future__ import annotations

import os

import pytest
import torch
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

from fullgraph.layers.qk_norm_rope import qk_norm_rope_store_kv
from fullgraph.layers.rotary import RotaryEmbedding

HQ, HKV, D = 4, 2, 64


def make_inputs(t: int, slots: int, dtype=torch.float32, device="cpu", seed=0,
                norm: bool = True):
    """`norm` False: no q/k norm weights (a Llama layer's prologue: rotary only)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    rope = RotaryEmbedding(D, 4096, 1e6).to(device)
    qkv = rnd(t, (HQ + 2 * HKV) * D) * 3
    weights = (rnd(D), rnd(D)) if norm else (None, None)
    return dict(qkv=qkv,
                positions=torch.randint(0, 4096, (t,), generator=g).to(device),
                cos=rope.cos, sin=rope.sin, q_weight=weights[0], k_weight=weights[1], eps=1e-6,
                num_heads=HQ, num_kv_heads=HKV,
                k_cache=torch.zeros(slots, HKV, D, dtype=dtype, device=device),
                v_cache=torch.zeros(slots, HKV, D, dtype=dtype, device=device),
                slot_mapping=torch.randperm(slots, generator=g)[:t].to(device))


def hf_reference(a: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [T, H, D] as transformers' Qwen3Attention computes them (LlamaAttention's,
    which has no q/k norm, without weights), in float32."""
    t = a["qkv"].shape[0]
    q, k, v = a["qkv"].float().split((HQ * D, HKV * D, HKV * D), dim=-1)
    q, k = q.reshape(1, t, HQ, D), k.reshape(1, t, HKV, D)
    if a["q_weight"] is not None:
        norms = []
        for w in (a["q_weight"], a["k_weight"]):
            n = Qwen3RMSNorm(D, a["eps"]).to(a["qkv"].device)
            n.weight.data = w.float()
            norms.append(n)
        q, k = norms[0](q), norms[1](k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    pos = a["positions"]
    q, k = apply_rotary_pos_emb(q, k, a["cos"][pos][None], a["sin"][pos][None])
    return q[0].transpose(0, 1), k[0].transpose(0, 1), v.reshape(t, HKV, D)


@pytest.mark.parametrize("norm", [True, False])
def test_reference_path_matches_transformers_and_stores_only_its_slots(norm):
    a = make_inputs(t=7, slots=40, norm=norm)
    q = qk_norm_rope_store_kv(**a)
    q_ref, k_ref, v_ref = hf_reference(a)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    slots = a["slot_mapping"]
    torch.testing.assert_close(a["k_cache"][slots], k_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(a["v_cache"][slots], v_ref)
    others = torch.ones(40, dtype=torch.bool)
    others[slots] = False
    assert not a["k_cache"][others].any() and not a["v_cache"][others].any()


@pytest.mark.parametrize("layout", ["separate", "views"])
def test_compiled_store_is_in_place_not_a_copy_of_the_cache(layout):
    """Compiled as the layers are (dynamic shapes), the op must get the cache tensors
    themselves, not a copy of their storage that inductor copies back afterwards. Caches
    that are views of one allocation get copied: the model runner allocates them apart."""
    a = make_inputs(t=5, slots=4096)
    if layout == "views":
        layers = torch.zeros(2, 2, *a["k_cache"].shape)     # [layer, K/V, slots, Hkv, D]
        a["k_cache"], a["v_cache"] = layers[1]
    seen = []
    original = qk_norm_rope_store_kv.op._init_fn

    def recording(*args):
        seen.append((args[9].data_ptr(), args[10].data_ptr()))
        return original(*args)

    def step(qkv, positions, k_cache, v_cache, slot_mapping):
        return qk_norm_rope_store_kv(qkv * 1.0, positions, a["cos"], a["sin"], a["q_weight"],
                                     a["k_weight"], 1e-6, HQ, HKV, k_cache, v_cache,
                                     slot_mapping) + 0.0

    qk_norm_rope_store_kv.op.register_kernel("cpu")(recording)
    try:
        torch._dynamo.reset()
        torch.compile(step, dynamic=True, fullgraph=True)(
            a["qkv"], a["positions"], a["k_cache"], a["v_cache"], a["slot_mapping"])
    finally:
        qk_norm_rope_store_kv.op.register_kernel("cpu")(original)
    in_place = seen == [(a["k_cache"].data_ptr(), a["v_cache"].data_ptr())]
    assert in_place == (layout == "separate")


def test_kernel_matches_the_reference_path_in_the_interpreter():
    """The Triton kernel (both head layouts, with and without the q/k norm) under Triton's
    CPU interpreter == the reference path, float32 (tests/qk_norm_rope_interpret.py)."""
    pytest.importorskip("triton")
    import triton_interpret
    res = triton_interpret.run(os.path.join(triton_interpret.HERE, "qk_norm_rope_interpret.py"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "FAILURES 0" in res.stdout, res.stdout[-3000:]
