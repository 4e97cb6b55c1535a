"""The EAGLE-3 drafter presets (models/presets.py: `tiny-qwen3-eagle3`,
`qwen3-0.6b-random-eagle3`): they build the same every time, load through the drafter's
loading path (tests/test_eagle_models.py `load`), fit their target preset and no other, and
the tiny one drafts from the states its target captures, as the EAGLE math says; the tiny
hybrid's and vision-language target's drafters run beside their targets."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file

from fullgraph import LLM, SamplingParams
from fullgraph.models.eagle import Eagle3LlamaForCausalLM, drafter_class
from fullgraph.models.presets import PRESETS, build_preset, qwen3_config, resolve_model_path
from test_eagle_models import Steps, engine_with_aux, load, ref_eagle3

DRAFTERS = ["tiny-qwen3-eagle3", "qwen3-0.6b-random-eagle3"]


def target_config(name: str, **changes):
    """A target preset's config, with `changes`."""
    from transformers import Qwen3Config
    p = PRESETS[name]
    if p.vocab_size is None:        # the trained tokenizer's size: the built preset's
        with open(os.path.join(resolve_model_path(name), "config.json")) as f:
            config = json.load(f)
    else:                           # the 0.6B one's weights are 1.2 GB: its config only
        config = qwen3_config(p, p.vocab_size, eos=0)
    return Qwen3Config(**(config | changes))


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="module", params=DRAFTERS)
def drafter(request):
    path = resolve_model_path(request.param)
    return request.param, path, load(path, drafter_class("eagle3"))


def test_the_checkpoint_is_a_published_eagle3_layout(drafter):
    name, path, model = drafter
    target = PRESETS[PRESETS[name].target]
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 1
    assert config["hidden_size"] == target.hidden_size
    assert config["draft_vocab_size"] < config["vocab_size"]
    if target.vocab_size is not None:
        assert config["vocab_size"] == target.vocab_size
    assert len(load_tokenizer(path)) <= config["vocab_size"]
    tensors = load_file(os.path.join(path, "model.safetensors"))
    h, vd, v = config["hidden_size"], config["draft_vocab_size"], config["vocab_size"]
    assert tensors["fc.weight"].shape == (h, 3 * h)
    assert tensors["lm_head.weight"].shape == (vd, h)
    assert tensors["d2t"].dtype == torch.int64 and tensors["d2t"].shape == (vd,)
    assert tensors["t2d"].dtype == torch.bool and tensors["t2d"].shape == (v,)
    assert int(tensors["t2d"].sum()) == vd
    assert "embed_tokens.weight" not in tensors          # the target's is shared
    assert {k for k in tensors if k.startswith("midlayer.")} == {
        f"midlayer.{k}.weight" for k in (
            "input_layernorm", "hidden_norm", "post_attention_layernorm", "self_attn.q_proj",
            "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")}
    # loaded: the vocabulary map is t2d's ids, the embedding awaits the target's
    assert isinstance(model, Eagle3LlamaForCausalLM) and model.maps_vocab
    assert torch.equal(model.draft_to_target, tensors["t2d"].nonzero().squeeze(1))
    assert model.embedding_from_target


def test_fits_its_target_and_no_other(drafter):
    name, _, model = drafter
    target = PRESETS[name].target
    model.check_target(target_config(target))
    layers = model.aux_hidden_state_layers(target_config(target))
    assert layers == PRESETS[name].aux_layer_ids
    assert all(0 <= i < PRESETS[target].num_hidden_layers for i in layers)
    assert len(layers) * PRESETS[target].hidden_size == model.fc.in_features
    other = "qwen3-0.6b-random" if target == "tiny-qwen3" else "tiny-qwen3"
    with pytest.raises(ValueError, match="hidden size"):
        model.check_target(target_config(other))
    with pytest.raises(ValueError, match="vocab_size"):
        model.check_target(target_config(target, vocab_size=model.config.vocab_size + 1))
    with pytest.raises(ValueError, match="layers"):
        model.check_target(target_config(target, num_hidden_layers=max(layers)))


def test_builds_the_same_every_time(tmp_path):
    """Seeded weights and a fixed tokenizer corpus: two builds, byte for byte."""
    for i in range(2):
        build_preset(PRESETS["tiny-qwen3-eagle3"], str(tmp_path / f"build{i}"))
    for file in sorted(os.listdir(tmp_path / "build0")):
        assert (tmp_path / "build0" / file).read_bytes() == \
            (tmp_path / "build1" / file).read_bytes(), file
    with open(os.path.join(resolve_model_path("tiny-qwen3"), "tokenizer.json")) as f:
        assert (tmp_path / "build0" / "tokenizer.json").read_text() == f.read()


def test_tiny_drafts_from_its_targets_states(monkeypatch):
    """tiny-qwen3 captures the inputs of the drafter's layers during a prefill; the drafter's
    prefill over them (the prompt shifted by one plus the sampled token) equals the EAGLE-3
    reference on the checkpoint's tensors and the target's embedding."""
    path = resolve_model_path("tiny-qwen3-eagle3")
    model = load(path)
    target_path = resolve_model_path("tiny-qwen3")
    from transformers import AutoConfig
    target_cfg = AutoConfig.from_pretrained(target_path, local_files_only=True)
    model.check_target(target_cfg)
    llm, aux = engine_with_aux(monkeypatch, target_path,
                               model.aux_hidden_state_layers(target_cfg))
    prompt = llm.get_tokenizer().encode("The cat sat on the mat. Readability counts.")
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    embedding = llm.engine.runner.model.model.embed_tokens.weight
    model.use_target_weights(embedding)
    ids, states = prompt[1:] + out, aux[:len(prompt)].clone()
    steps = Steps()
    assert (model.config.hidden_size, model.config.num_attention_heads,
            model.config.num_key_value_heads, model.config.head_dim) == (64, 4, 2, 16)
    with torch.no_grad():
        drafted, logits = steps.forward_fn(model, steps.write(ids, states, 0), states.shape[1])()
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors["embed_tokens.weight"] = embedding
    ref_out, ref_logits = ref_eagle3(tensors, torch.tensor(ids), states,
                                     theta=model.config.rope_parameters["rope_theta"])
    torch.testing.assert_close(drafted, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target, kw", [("tiny-qwen3.5", dict(batch_invariant=True)),
                                        ("tiny-qwen3-vl", {})])
def test_hybrid_and_vision_language_presets_draft_for_their_targets(target, kw):
    """`tiny-qwen3.5-eagle3` and `tiny-qwen3-vl-eagle3` (random drafters over their targets'
    own vocabularies) load beside their targets; greedy output equals plain decoding's."""
    rng = random.Random(3)
    batch = [{"prompt_token_ids": [rng.randrange(3, 700) for _ in range(rng.randrange(1, 60))]}
             for _ in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def greedy(llm):
        return [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]
    want = greedy(LLM(target, max_model_len=256, **kw))
    llm = LLM(target, max_model_len=256, **kw, speculative_config={
        "method": "eagle3", "model": f"{target}-eagle3", "num_speculative_tokens": 3})
    assert greedy(llm) == want
    assert llm.engine.stats.spec_num_draft_tokens > 0
