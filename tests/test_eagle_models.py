"""EAGLE drafters (fullgraph/models/eagle.py) on tiny random checkpoints written in the
published layouts (config.json as SpecForge writes it for Qwen3, tensor names as vLLM and
SGLang load them), float32 on the CPU: loading and its errors, shapes, the forward of a
prefill and of a decode step (eager, and captured in a fake graph) against a plain-torch
reference of the EAGLE math written here from the checkpoint tensors, the draft-to-target
vocabulary map, and the checks against a target's config. Then the targets' side: the
residual stream entering chosen layers (`enable_aux_hidden_states`, which EAGLE-3 reads)
against transformers' `hidden_states`, through the engine."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import one_request_inputs
from fullgraph import SamplingParams
from fullgraph.attention.backend import ForwardContext
from fullgraph.attention.flex import FlexAttentionBackend
from fullgraph.attention.metadata import AttentionSpec, PersistentInputs, StepAttentionInputs
from fullgraph.models.eagle import (Eagle3LlamaForCausalLM, EagleLlamaForCausalLM,
                                    drafter_class)
from fullgraph.models.loader import iterate_weights
from fullgraph.worker.cudagraph.fake import FakeGraphRuntime

H, HEADS, KV_HEADS, D, I, V, VD, THETA = 64, 4, 2, 16, 96, 256, 96, 10000.0
# SpecForge's configs/qwen3-4b-eagle3.json with tiny sizes
EAGLE3_CONFIG = {
    "architectures": ["LlamaForCausalLMEagle3"], "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": D,
    "hidden_act": "silu", "hidden_size": H, "initializer_range": 0.02, "intermediate_size": I,
    "max_position_embeddings": 512, "max_window_layers": 36, "model_type": "llama",
    "num_attention_heads": HEADS, "num_hidden_layers": 1, "num_key_value_heads": KV_HEADS,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": THETA, "sliding_window": None,
    "tie_word_embeddings": True, "torch_dtype": "float32", "transformers_version": "4.51.0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": V, "draft_vocab_size": VD}


def layer_tensors(g: torch.Generator, prefix: str, in_features: int, input_norm=True,
                  hidden_norm=False) -> dict[str, torch.Tensor]:
    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.2
    t = {f"{prefix}self_attn.q_proj.weight": w(HEADS * D, in_features),
         f"{prefix}self_attn.k_proj.weight": w(KV_HEADS * D, in_features),
         f"{prefix}self_attn.v_proj.weight": w(KV_HEADS * D, in_features),
         f"{prefix}self_attn.o_proj.weight": w(H, HEADS * D),
         f"{prefix}mlp.gate_proj.weight": w(I, H), f"{prefix}mlp.up_proj.weight": w(I, H),
         f"{prefix}mlp.down_proj.weight": w(H, I),
         f"{prefix}post_attention_layernorm.weight": 1 + w(H)}
    if input_norm:
        t[f"{prefix}input_layernorm.weight"] = 1 + w(H)
    if hidden_norm:
        t[f"{prefix}hidden_norm.weight"] = 1 + w(H)
    return t


def eagle3_tensors(seed=0, embedding=True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    targets = torch.randperm(V, generator=g)[:VD].sort().values       # the draft vocabulary
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[targets] = True
    t = {"fc.weight": torch.randn(H, 3 * H, generator=g) * 0.1,
         "norm.weight": 1 + torch.randn(H, generator=g) * 0.2,
         "lm_head.weight": torch.randn(VD, H, generator=g) * 0.2,
         "d2t": targets - torch.arange(VD), "t2d": t2d,
         **layer_tensors(g, "midlayer.", 2 * H, hidden_norm=True)}
    if embedding:
        t["embed_tokens.weight"] = torch.randn(V, H, generator=g)
    return t


def eagle1_tensors(seed=0, layers=2, fc_bias=True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {"fc.weight": torch.randn(H, 2 * H, generator=g) * 0.1,
         "embed_tokens.weight": torch.randn(V, H, generator=g)}
    if fc_bias:
        t["fc.bias"] = torch.randn(H, generator=g) * 0.1
    for i in range(layers):
        t |= layer_tensors(g, f"layers.{i}.", H, input_norm=i > 0)
    return t


def write(path, config: dict, tensors: dict[str, torch.Tensor]) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(path, "model.safetensors"))
    return str(path)


def load(path, cls=Eagle3LlamaForCausalLM):
    from transformers import AutoConfig
    model = cls(AutoConfig.from_pretrained(path, local_files_only=True), max_position=512)
    model.load_weights(iterate_weights(path, progress=False))
    return model.eval().requires_grad_(False)


def target_config(layers=8, hidden=H, vocab=V, **kw):
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, **kw)


# --------------------------------------------------------------- the reference, plain torch
def rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, positions, theta=THETA):
    inv = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    ang = positions[:, None].float() * inv[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    half = torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1)
    return x * cos + half * sin


def ref_layer(t, p, attn_in, residual, theta=THETA):
    """A Llama layer over one sequence at positions 0..T-1: causal GQA attention from
    `attn_in`, the residual added, then the SwiGLU MLP with its norm."""
    n = attn_in.shape[0]
    pos = torch.arange(n)
    q = rope((attn_in @ t[p + "self_attn.q_proj.weight"].T).view(n, HEADS, D), pos, theta)
    k = rope((attn_in @ t[p + "self_attn.k_proj.weight"].T).view(n, KV_HEADS, D), pos, theta)
    v = (attn_in @ t[p + "self_attn.v_proj.weight"].T).view(n, KV_HEADS, D)
    k, v = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / D ** 0.5
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, -1)
    h = residual + o @ t[p + "self_attn.o_proj.weight"].T
    m = rms(h, t[p + "post_attention_layernorm.weight"])
    gate, up = m @ t[p + "mlp.gate_proj.weight"].T, m @ t[p + "mlp.up_proj.weight"].T
    return h + (torch.nn.functional.silu(gate) * up) @ t[p + "mlp.down_proj.weight"].T


def ref_eagle3(t, ids, aux, theta=THETA):
    """(pre-norm output, target-vocabulary logits) of EAGLE-3 over one sequence."""
    h = aux @ t["fc.weight"].T
    x = torch.cat([rms(t["embed_tokens.weight"][ids], t["midlayer.input_layernorm.weight"]),
                   rms(h, t["midlayer.hidden_norm.weight"])], -1)
    out = ref_layer(t, "midlayer.", x, h, theta)
    logits = torch.full((len(ids), t["embed_tokens.weight"].shape[0]), float("-inf"))
    draft_ids = torch.arange(t["d2t"].shape[0])
    logits[:, draft_ids + t["d2t"]] = rms(out, t["norm.weight"]) @ t["lm_head.weight"].T
    return out, logits


def ref_eagle1(t, ids, hidden, layers=2):
    x = torch.cat([t["embed_tokens.weight"][ids], hidden], -1) @ t["fc.weight"].T
    x = x + t.get("fc.bias", torch.zeros(H))
    for i in range(layers):
        p = f"layers.{i}."
        x = ref_layer(t, p, rms(x, t[p + "input_layernorm.weight"]) if i else x, x)
    return x


# ----------------------------------------------------------------------- steps over a cache
class Steps:
    """One request's steps through the flex backend's CPU path over persistent inputs, as
    the runner drives a model (the drafter's single-layer cache)."""
    BS, BLOCKS, MAX_TOKENS, MAX_BLOCKS = 4, 32, 64, 16

    def __init__(self, layers: int = 1) -> None:
        spec = AttentionSpec(layers, HEADS, KV_HEADS, D, self.BS, self.BLOCKS, 1,
                             self.MAX_TOKENS, self.MAX_BLOCKS, torch.float32)
        self.bt = torch.zeros(2, self.MAX_BLOCKS, dtype=torch.int32)
        self.bt[0] = torch.arange(1, self.MAX_BLOCKS + 1)
        self.pos, self.slots, self.ids = (torch.zeros(self.MAX_TOKENS, dtype=torch.int64)
                                          for _ in range(3))
        self.hidden = torch.zeros(self.MAX_TOKENS, 3 * H)
        self.seq, self.qsl = torch.zeros(1, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
        self.backend = FlexAttentionBackend(spec, torch.device("cpu"),
                                            PersistentInputs(self.bt, self.pos))
        self.kv = [(torch.zeros(self.BLOCKS * self.BS, KV_HEADS, D),
                    torch.zeros(self.BLOCKS * self.BS, KV_HEADS, D)) for _ in range(layers)]

    def write(self, ids, hidden, start: int) -> StepAttentionInputs:
        n = len(ids)
        p = torch.arange(start, start + n)
        self.ids[:n], self.pos[:n] = torch.tensor(ids), p
        self.hidden[:n, :hidden.shape[1]] = hidden
        self.slots[:n] = self.bt[0, p // self.BS].long() * self.BS + p % self.BS
        self.seq[0], self.qsl[1] = start + n, n
        return one_request_inputs(n, self.pos, self.slots, self.seq, self.qsl, self.bt)

    def forward_fn(self, model, inputs: StepAttentionInputs, width: int):
        """Host work now; returns the device part (what a graph captures): (hidden, logits)."""
        n = inputs.num_tokens
        self.backend.prepare(inputs)
        meta = self.backend.build(inputs)
        ctx = ForwardContext(self.backend, meta, self.kv, self.slots[:n])
        logits = torch.empty(n, model.config.vocab_size)

        def forward():
            self.backend.update(meta, inputs)
            out = model(self.ids[:n], self.hidden[:n, :width], self.pos[:n], ctx)
            return out, model.compute_logits(out, logits)
        return forward


# --------------------------------------------------------------------------------- EAGLE-3
@pytest.fixture(scope="module")
def eagle3(tmp_path_factory):
    tensors = eagle3_tensors()
    return tensors, load(write(tmp_path_factory.mktemp("eagle3"), EAGLE3_CONFIG, tensors))


def test_eagle3_loads_the_published_layout(eagle3):
    t, model = eagle3
    assert model.fc.weight.shape == (H, 3 * H)
    assert model.midlayer.self_attn.qkv_proj.weight.shape == ((HEADS + 2 * KV_HEADS) * D, 2 * H)
    assert model.lm_head.weight.shape == (VD, H) and model.maps_vocab
    torch.testing.assert_close(model.midlayer.self_attn.qkv_proj.weight[:HEADS * D],
                               t["midlayer.self_attn.q_proj.weight"])
    assert torch.equal(model.draft_to_target, torch.arange(VD) + t["d2t"])
    assert not model.embedding_from_target
    spec = Eagle3LlamaForCausalLM.cache_specs(model.config).attention
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (1, 4, 2, 16)
    assert drafter_class("eagle3") is Eagle3LlamaForCausalLM


def test_eagle3_prefill_then_decode_match_the_reference(eagle3):
    """A prefill reads the target's three hidden states; the next step reads the drafter's
    own output (both in one cache); logits land at the draft tokens' target ids."""
    t, model = eagle3
    g = torch.Generator().manual_seed(1)
    ids, aux = torch.randint(0, V, (7,), generator=g).tolist(), torch.randn(7, 3 * H, generator=g)
    steps = Steps()
    with torch.no_grad():
        out, logits = steps.forward_fn(model, steps.write(ids, aux, 0), 3 * H)()
        ref_out, ref_logits = ref_eagle3(t, torch.tensor(ids), aux)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        assert logits.isinf().sum(-1).eq(V - VD).all()
        nxt = int(model.draft_to_target[ref_logits[-1, model.draft_to_target].argmax()])
        assert int(logits[-1].argmax()) == nxt

        # decode, captured on other inputs: the next token with the last output as its
        # hidden state (width H, no fc); the reference reruns the sequence with that row
        graph, (dec_out, dec_logits) = FakeGraphRuntime().capture(
            steps.forward_fn(model, steps.write([1], torch.zeros(1, H), 7), H))
        steps.backend.prepare(steps.write([nxt], out[-1:], 7))
        FakeGraphRuntime().replay(graph)
        h_all = torch.cat([aux @ t["fc.weight"].T, out[-1:]])
        seq = torch.tensor(ids + [nxt])
        x = torch.cat([rms(t["embed_tokens.weight"][seq], t["midlayer.input_layernorm.weight"]),
                       rms(h_all, t["midlayer.hidden_norm.weight"])], -1)
        ref_dec = ref_layer(t, "midlayer.", x, h_all)[-1:]
        torch.testing.assert_close(dec_out, ref_dec, atol=1e-5, rtol=1e-5)
        draft = model.compute_draft_logits(dec_out, torch.empty(1, VD))
        torch.testing.assert_close(dec_logits[:, model.draft_to_target], draft)


def test_eagle3_without_embedding_shares_the_targets(tmp_path, eagle3):
    t, _ = eagle3
    tensors = {k: v for k, v in t.items() if k != "embed_tokens.weight"}
    # vLLM's own names for the layer and a "model." prefix load the same
    tensors = {("model." + k.replace("midlayer.", "layers.0.")): v for k, v in tensors.items()}
    model = load(write(tmp_path, EAGLE3_CONFIG, tensors))
    assert model.embedding_from_target
    steps, ids, aux = Steps(), [3, 4, 5], torch.randn(3, 3 * H)
    with pytest.raises(RuntimeError, match="use_target_weights"):
        steps.forward_fn(model, steps.write(ids, aux, 0), 3 * H)()
    target_embedding = torch.nn.Parameter(t["embed_tokens.weight"].clone(), requires_grad=False)
    model.use_target_weights(target_embedding)
    assert model.embed_tokens.weight is target_embedding
    with torch.no_grad():
        out, _ = steps.forward_fn(model, steps.write(ids, aux, 0), 3 * H)()
    torch.testing.assert_close(out, ref_eagle3(t, torch.tensor(ids), aux)[0], atol=1e-5,
                               rtol=1e-5)


def test_eagle3_same_vocabulary_needs_no_map(tmp_path):
    t = eagle3_tensors()
    t["lm_head.weight"] = torch.randn(V, H) * 0.2
    del t["d2t"], t["t2d"]
    model = load(write(tmp_path, EAGLE3_CONFIG | {"draft_vocab_size": None}, t))
    assert not model.maps_vocab and model.draft_vocab_size == V


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("d2t"), "no d2t map"),
    (lambda t: t.__setitem__("d2t", t["d2t"] + V), "outside"),
    (lambda t: t.__setitem__("t2d", torch.ones(V, dtype=torch.bool)), "t2d"),
    (lambda t: t.pop("midlayer.hidden_norm.weight"), "missing weights"),
    (lambda t: t.__setitem__("fc.weight", torch.zeros(H, 2 * H)), "shape"),
    (lambda t: t.__setitem__("midlayer.extra.weight", torch.zeros(1)), "unexpected"),
])
def test_eagle3_bad_checkpoints_are_named(tmp_path, change, message):
    t = eagle3_tensors()
    change(t)
    with pytest.raises(ValueError, match=message):
        load(write(tmp_path, EAGLE3_CONFIG, t))


def test_eagle3_checks_the_config_and_the_target(eagle3):
    from transformers import LlamaConfig
    _, model = eagle3
    model.check_target(target_config())
    assert model.aux_hidden_state_layers(target_config(layers=8)) == (2, 4, 5)
    with pytest.raises(ValueError, match="hidden size 64.*hidden_size is 128"):
        model.check_target(target_config(hidden=128))
    with pytest.raises(ValueError, match="vocab_size 256 does not match.*512"):
        model.check_target(target_config(vocab=512))
    with pytest.raises(ValueError, match="set eagle_aux_hidden_state_layer_ids.*target has 2 "
                                         "layers: a drafter made for another target"):
        model.check_target(target_config(layers=2))        # defaults (2, 1, -1)
    for bad, message in (({"num_hidden_layers": 2}, "num_hidden_layers=2"),
                         ({"hidden_act": "gelu"}, "hidden_act"),
                         ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope")):
        with pytest.raises(ValueError, match=message):
            Eagle3LlamaForCausalLM.check_config(LlamaConfig(**(EAGLE3_CONFIG | bad)))


def test_eagle3_reads_the_configured_target_layers():
    from transformers import LlamaConfig
    cfg = LlamaConfig(**EAGLE3_CONFIG, eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 1, 1]})
    model = Eagle3LlamaForCausalLM(cfg, max_position=64)
    assert model.aux_hidden_state_layers(target_config(layers=2)) == (0, 1, 1)
    with pytest.raises(ValueError, match="reads target layers \\(0, 1, 1\\) \\(the drafter "
                                         "config's.*target has 1 layers"):
        model.check_target(target_config(layers=1))


# --------------------------------------------------------------------------------- EAGLE-1
EAGLE1_CONFIG = {k: v for k, v in EAGLE3_CONFIG.items() if k != "draft_vocab_size"} | {
    "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}


@pytest.mark.parametrize("fc_bias", [True, False])
def test_eagle1_loads_and_runs_with_the_targets_lm_head(tmp_path, fc_bias):
    t = eagle1_tensors(fc_bias=fc_bias)
    model = load(write(tmp_path, EAGLE1_CONFIG, t), EagleLlamaForCausalLM)
    assert drafter_class("eagle") is EagleLlamaForCausalLM
    assert model.layers[0].input_layernorm is None and model.layers[1].input_layernorm is not None
    assert EagleLlamaForCausalLM.cache_specs(model.config).attention.num_layers == 2
    lm_head = torch.randn(V, H)
    model.use_target_weights(torch.randn(V, H), lm_head)   # the checkpoint's embedding stays
    g = torch.Generator().manual_seed(2)
    ids, hidden = torch.randint(0, V, (6,), generator=g).tolist(), torch.randn(6, H, generator=g)
    steps = Steps(layers=2)
    with torch.no_grad():
        out, logits = steps.forward_fn(model, steps.write(ids, hidden, 0), H)()
    ref = ref_eagle1(t, torch.tensor(ids), hidden)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, out @ lm_head.T)      # no norm before the head


def test_eagle1_needs_the_targets_lm_head(tmp_path):
    model = load(write(tmp_path, EAGLE1_CONFIG, eagle1_tensors()), EagleLlamaForCausalLM)
    with pytest.raises(RuntimeError, match="use_target_weights"):
        model.compute_logits(torch.zeros(1, H), torch.empty(1, V))
    with pytest.raises(ValueError, match="LM head"):
        model.use_target_weights(torch.zeros(V, H), torch.zeros(V + 1, H))
    model.check_target(target_config())
    with pytest.raises(ValueError, match="hidden size"):
        model.check_target(target_config(hidden=32))
    with pytest.raises(ValueError, match="speculative method 'medusa' is not supported"):
        drafter_class("medusa")


# ------------------------------------------------------- targets: aux hidden-state capture
MAX_TOKENS = 128       # the engine's max_num_batched_tokens below: every step's padded rows
# float32, the same ops in another order (fused norms, packed attention, the chunked delta
# rule): at most 2e-5 (Qwen3) and 7e-5 (the hybrid) seen on states up to 33 in size; a
# neighbouring layer's input differs by 10 or more
TOL = dict(atol=2e-4, rtol=2e-5)
ENGINES = {
    "eager": dict(attention_backend="flex"),
    # the capture is recorded into the graphs (enabled at load, before capture) and replayed
    "fake-graphs": dict(cudagraph_runtime="fake",
                        cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32, 64, 128]),
}


def engine_with_aux(monkeypatch, path: str, layers: tuple[int, ...], **kw):
    """(LLM whose model writes the inputs of `layers`, that buffer): enabled right after
    loading, before the memory profile and graph capture, as the engine will."""
    from fullgraph import LLM
    from fullgraph.worker import model_runner
    load, buffers = model_runner.load_model, []

    def load_with_aux(*args, **kwargs):
        model = load(*args, **kwargs)
        buffers.append(model.enable_aux_hidden_states(layers, MAX_TOKENS))
        return model
    monkeypatch.setattr(model_runner, "load_model", load_with_aux)
    llm = LLM(path, max_model_len=256, num_gpu_blocks_override=64, max_num_seqs=4,
              max_num_batched_tokens=MAX_TOKENS, **kw)
    return llm, buffers[0]


def hf_aux(hf, ids: list[int], layers: tuple[int, ...]) -> torch.Tensor:
    """transformers' inputs of `layers` over `ids`, side by side: [len(ids), len(layers) H]
    (its hidden_states[i] is the input of layer i, [0] the embedding)."""
    with torch.no_grad():
        states = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.cat([states[i][0] for i in layers], dim=-1)


@pytest.fixture(scope="module")
def qwen3_target(tmp_path_factory):
    from conftest import make_hf_checkpoint
    from transformers import Qwen3ForCausalLM
    path = make_hf_checkpoint(str(tmp_path_factory.mktemp("qwen3-4-layers")), num_layers=4,
                              seed=3)
    return path, Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def qwen3_5_target(tmp_path_factory):
    from conftest import make_hybrid_checkpoint
    from transformers import Qwen3_5ForCausalLM
    path = make_hybrid_checkpoint(str(tmp_path_factory.mktemp("qwen3_5")), seed=3)
    return path, Qwen3_5ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# Layers out of order and repeated; the hybrid's are Gated DeltaNet layers 0-2 and the
# full-attention layer 3.
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("target, layers", [("qwen3_target", (3, 0, 2, 2)),
                                            ("qwen3_5_target", (2, 0, 3, 3))])
def test_aux_hidden_states_match_transformers(request, monkeypatch, hf_gdn_torch_paths,
                                              target, layers, engine):
    path, hf = request.getfixturevalue(target)
    llm, aux = engine_with_aux(monkeypatch, path, layers, **ENGINES[engine])
    h = hf.config.hidden_size
    assert aux.shape == (MAX_TOKENS, len(layers) * h) and aux.dtype == torch.float32
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 700, (n,), generator=g).tolist() for n in (7, 13, 1)]

    # one prefill step of all three prompts: their rows packed in order
    steps = llm.engine.stats.steps
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.engine.stats.steps == steps + 1
    expected = torch.cat([hf_aux(hf, p, layers) for p in prompts])
    torch.testing.assert_close(aux[:len(expected)], expected, **TOL)

    # decode steps of one request: the last one's row is its last input token
    out = llm.generate([{"prompt_token_ids": prompts[1]}],
                       SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    torch.testing.assert_close(aux[:1], hf_aux(hf, prompts[1] + out[:2], layers)[-1:], **TOL)
    if engine == "fake-graphs":
        assert llm.engine.runner.dispatcher.num_graph_steps >= 2


def test_aux_hidden_state_layers_are_checked(qwen3_target):
    from fullgraph.models.qwen3 import Qwen3ForCausalLM
    from transformers import AutoConfig
    model = Qwen3ForCausalLM(AutoConfig.from_pretrained(qwen3_target[0]), max_position=64)
    assert model.model.aux_hidden_states is None          # off unless enabled
    for layers in ((), (0, 4), (-1,)):
        with pytest.raises(ValueError, match="layers 0..3"):
            model.enable_aux_hidden_states(layers, 8)
    buffer = model.enable_aux_hidden_states([1, 1], 8)
    assert buffer.shape == (8, 2 * 64) and model.model.aux_hidden_states.layers == (1, 1)
