"""Built-in presets: random-weight checkpoints and a small tokenizer, made locally.

`--model tiny-qwen3` works on a fresh machine with no network: the first use writes a
Hugging Face-format directory (config.json, model.safetensors, tokenizer files with a chat
template) under the cache directory, later uses load it from there. The `-eagle3` presets are
EAGLE-3 drafter checkpoints for a target preset (docs/speculative.md): a drafter's directory,
not a model to serve on its own.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# vision-language presets: vision start, image placeholder, vision end (Qwen's spellings)
VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# A fixed training text, so every machine builds the same tokenizer.
_CORPUS = """\
Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.
Complex is better than complicated. Flat is better than nested. Sparse is better than dense.
Readability counts. Special cases aren't special enough to break the rules.
Errors should never pass silently, unless explicitly silenced.
In the face of ambiguity, refuse the temptation to guess.
Once upon a time there was a little model that wanted to write stories. Every morning it read
the weights of its layers, one after another, and every evening it wrote a new token.
The cat sat on the mat. The dog ran in the park with a red ball, and the children laughed.
Large language models generate text one token at a time. Serving them quickly means batching
many requests together, caching keys and values, and keeping the accelerator busy.
user: What is two plus two? assistant: Two plus two is four. user: Thank you! assistant: You are welcome.
The quick brown fox jumps over the lazy dog. A paged KV cache stores keys and values in blocks.
Every model step runs as one full CUDA graph; decoding reads the weights once per step.
Hello, world! How are you today? I am fine, thank you. What is the capital of France?
Paris is the capital of France. Berlin is the capital of Germany. Tokyo is in Japan.
def main():\n    print("hello")\n    return 0\n
1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 (a + b) * c = d; x[i] = y[j] / z
"""


@dataclass(frozen=True)
class Preset:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int | None          # None: the trained tokenizer's size
    max_position_embeddings: int
    dtype: str
    tie_word_embeddings: bool = True
    tokenizer_vocab: int = 1024
    # Hybrid (Gated DeltaNet) presets: transformers' Qwen3_5TextConfig fields beyond the
    # above; their random weights come from transformers' own initialization.
    hybrid: dict | None = None
    # Vision-language presets (Qwen3-VL): the vision tower's config fields and the text
    # model's MRoPE section; random weights from transformers' own initialization.
    vision: dict | None = None


@dataclass(frozen=True)
class Eagle3Preset:
    """An EAGLE-3 drafter for a target preset, laid out as SpecForge publishes Qwen3's
    (docs/speculative.md): a one-layer Llama config.json with the target's hidden size,
    vocabulary, tokenizer, context and dtype, and random weights under the published tensor
    names, without the token embedding (the target's is shared)."""
    name: str
    target: str                     # the target preset's name
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    draft_vocab_size: int
    aux_layer_ids: tuple[int, ...]  # the target layers whose inputs fc reads, in order


def _qwen3_5_fields(key_heads: int, value_heads: int, head_dim: int) -> dict:
    return {"linear_num_key_heads": key_heads, "linear_num_value_heads": value_heads,
            "linear_key_head_dim": head_dim, "linear_value_head_dim": head_dim,
            "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0,
                                "partial_rotary_factor": 0.25}}


PRESETS = {
    # For tests and first runs on a CPU: milliseconds per step.
    "tiny-qwen3": Preset("tiny-qwen3", 64, 192, 2, 4, 2, 16, None, 4096, "float32"),
    # Qwen3-0.6B's shapes with random bf16 weights, for GPU benchmarks.
    "qwen3-0.6b-random": Preset("qwen3-0.6b-random", 1024, 3072, 28, 16, 8, 128, 151936,
                                40960, "bfloat16"),
    # Qwen3-4B's and Qwen3-8B's shapes with random bf16 weights (8 GB and 16 GB), for GPU
    # benchmarks of larger targets (speculative decoding's gain grows with the target).
    "qwen3-4b-random": Preset("qwen3-4b-random", 2560, 9728, 36, 32, 8, 128, 151936, 40960,
                              "bfloat16"),
    "qwen3-8b-random": Preset("qwen3-8b-random", 4096, 12288, 36, 32, 8, 128, 151936, 40960,
                              "bfloat16", tie_word_embeddings=False),
    # A hybrid for tests: 3 Gated DeltaNet layers, then a gated full-attention layer.
    "tiny-qwen3.5": Preset("tiny-qwen3.5", 64, 192, 4, 4, 2, 32, None, 4096, "float32",
                           hybrid=_qwen3_5_fields(2, 4, 16)),
    # A vision-language model for tests and first runs: Qwen3-VL's layout, tiny.
    "tiny-qwen3-vl": Preset("tiny-qwen3-vl", 64, 192, 2, 4, 2, 16, None, 4096, "float32",
                            tie_word_embeddings=False, vision=dict(
                                depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                                out_hidden_size=64, num_position_embeddings=64,
                                deepstack_visual_indexes=[0, 1], mrope_section=[2, 3, 3])),
    # Qwen/Qwen3-VL-2B-Instruct's shapes with random bf16 weights, for GPU benchmarks.
    "qwen3-vl-2b-random": Preset("qwen3-vl-2b-random", 2048, 6144, 28, 16, 8, 128, 151936,
                                 262144, "bfloat16", tie_word_embeddings=True, vision=dict(
                                     depth=24, hidden_size=1024, intermediate_size=4096,
                                     num_heads=16, patch_size=16, temporal_patch_size=2,
                                     spatial_merge_size=2, out_hidden_size=2048,
                                     num_position_embeddings=2304,
                                     deepstack_visual_indexes=[5, 11, 17],
                                     mrope_section=[24, 20, 20])),
    # The text model of Qwen/Qwen3.5-0.8B with random bf16 weights, for GPU benchmarks.
    "qwen3.5-0.8b-random": Preset("qwen3.5-0.8b-random", 1024, 3584, 24, 8, 2, 256, 248320,
                                  262144, "bfloat16", hybrid=_qwen3_5_fields(16, 16, 128)),
    # EAGLE-3 drafters for the presets above. A 2-layer target has no default aux layers
    # (vLLM's (2, L // 2, L - 3)), so tiny-qwen3's names its own; the 0.6B one names the
    # default, with SpecForge's published shapes scaled to the target (head_dim = hidden /
    # heads, 8 KV heads, the target's intermediate size, a 32000-token draft vocabulary).
    "tiny-qwen3-eagle3": Eagle3Preset(
        "tiny-qwen3-eagle3", target="tiny-qwen3", num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=192, draft_vocab_size=256, aux_layer_ids=(0, 1, 1)),
    "qwen3-0.6b-random-eagle3": Eagle3Preset(
        "qwen3-0.6b-random-eagle3", target="qwen3-0.6b-random", num_attention_heads=16,
        num_key_value_heads=8, head_dim=64, intermediate_size=3072, draft_vocab_size=32000,
        aux_layer_ids=(2, 14, 25)),
    # ... and for the tiny hybrid and vision-language presets (their own vocabularies)
    "tiny-qwen3.5-eagle3": Eagle3Preset(
        "tiny-qwen3.5-eagle3", target="tiny-qwen3.5", num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=192, draft_vocab_size=256,
        aux_layer_ids=(0, 2, 3)),
    "tiny-qwen3-vl-eagle3": Eagle3Preset(
        "tiny-qwen3-vl-eagle3", target="tiny-qwen3-vl", num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=192, draft_vocab_size=256,
        aux_layer_ids=(0, 1, 1)),
}


def cache_root() -> str:
    root = os.environ.get("FULLGRAPH_CACHE_DIR")
    if root:
        return root
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "fullgraph")


def resolve_model_path(model: str) -> str:
    """A local directory as given, or a preset's directory (built on first use)."""
    if model in PRESETS and not os.path.isdir(model):
        path = os.path.join(cache_root(), "presets", model)
        if not os.path.exists(os.path.join(path, "config.json")):
            build_preset(PRESETS[model], path)
        return path
    return model


def train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _random_init(seed: int, dtype: torch.dtype):
    """(normal(*shape): N(0, 0.02) weights, ones(n): norm weights near 1), drawn in call
    order from one seeded generator."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    def ones(n):
        return (1.0 + 0.1 * torch.randn(n, generator=g)).to(dtype)
    return normal, ones


def random_weights(p: Preset, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    normal, ones = _random_init(seed, getattr(torch, p.dtype))
    h, d = p.hidden_size, p.head_dim
    w = {"model.embed_tokens.weight": normal(vocab, h), "model.norm.weight": ones(h)}
    for i in range(p.num_hidden_layers):
        pre = f"model.layers.{i}."
        w |= {
            pre + "self_attn.q_proj.weight": normal(p.num_attention_heads * d, h),
            pre + "self_attn.k_proj.weight": normal(p.num_key_value_heads * d, h),
            pre + "self_attn.v_proj.weight": normal(p.num_key_value_heads * d, h),
            pre + "self_attn.o_proj.weight": normal(h, p.num_attention_heads * d),
            pre + "self_attn.q_norm.weight": ones(d),
            pre + "self_attn.k_norm.weight": ones(d),
            pre + "mlp.gate_proj.weight": normal(p.intermediate_size, h),
            pre + "mlp.up_proj.weight": normal(p.intermediate_size, h),
            pre + "mlp.down_proj.weight": normal(h, p.intermediate_size),
            pre + "input_layernorm.weight": ones(h),
            pre + "post_attention_layernorm.weight": ones(h),
        }
    if not p.tie_word_embeddings:
        w["lm_head.weight"] = normal(vocab, h)
    return w


def build_preset(p: Preset | Eagle3Preset, path: str) -> None:
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{p.name}-", dir=parent)
    try:
        if isinstance(p, Eagle3Preset):
            _save_eagle3(p, PRESETS[p.target], tmp)
        else:
            _save_model(p, tmp)
        try:
            os.rename(tmp, path)     # atomic: a concurrent builder's result wins, ours is dropped
        except OSError:
            if not os.path.exists(os.path.join(path, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_tokenizer(p: Preset, tmp: str):
    tokenizer = train_tokenizer(p.tokenizer_vocab)
    if p.vision is not None:
        tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.save_pretrained(tmp)
    return tokenizer


def _eos_ids(tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]


def _save_model(p: Preset, tmp: str) -> None:
    tokenizer = _save_tokenizer(p, tmp)
    vocab = p.vocab_size or len(tokenizer)
    eos = _eos_ids(tokenizer)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos}, f, indent=2)
    if p.vision is not None:
        _save_vl(p, vocab, eos[1], tmp, tokenizer.convert_tokens_to_ids(VISION_TOKENS))
    elif p.hybrid is not None:
        _save_hybrid(p, vocab, eos[1], tmp)
    else:
        _save_qwen3(p, vocab, eos[1], tmp)


def qwen3_config(p: Preset, vocab: int, eos: int) -> dict:
    """The config.json of a dense (Qwen3ForCausalLM) preset."""
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "hidden_size": p.hidden_size, "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_hidden_layers, "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads, "head_dim": p.head_dim,
        "vocab_size": vocab, "max_position_embeddings": p.max_position_embeddings,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
        "attention_bias": False, "tie_word_embeddings": p.tie_word_embeddings,
        "torch_dtype": p.dtype, "bos_token_id": None, "eos_token_id": eos,
    }


def _save_qwen3(p: Preset, vocab: int, eos: int, tmp: str) -> None:
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(qwen3_config(p, vocab, eos), f, indent=2)
    save_file(random_weights(p, vocab), os.path.join(tmp, "model.safetensors"),
              metadata={"format": "pt"})


def _save_eagle3(p: Eagle3Preset, target: Preset, tmp: str) -> None:
    """The target's tokenizer, a config.json as SpecForge writes one (its
    configs/qwen3-4b-eagle3.json) and random weights."""
    tokenizer = _save_tokenizer(target, tmp)
    vocab, eos = target.vocab_size or len(tokenizer), _eos_ids(tokenizer)[1]
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(eagle3_config(p, target, vocab, eos), f, indent=2)
    used = draft_vocabulary(tokenizer, vocab, p.draft_vocab_size)
    save_file(eagle3_weights(p, target, used, vocab), os.path.join(tmp, "model.safetensors"),
              metadata={"format": "pt"})


def eagle3_config(p: Eagle3Preset, target: Preset, vocab: int, eos: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
        "num_hidden_layers": 1, "hidden_size": target.hidden_size,
        "intermediate_size": p.intermediate_size, "head_dim": p.head_dim,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads, "hidden_act": "silu",
        "attention_bias": False, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_scaling": None, "max_position_embeddings": target.max_position_embeddings,
        "vocab_size": vocab, "draft_vocab_size": p.draft_vocab_size,
        "eagle_aux_hidden_state_layer_ids": list(p.aux_layer_ids),
        # the LM head is the drafter's own, over the draft vocabulary (SGLang would tie it)
        "tie_word_embeddings": False, "torch_dtype": target.dtype, "bos_token_id": None,
        "eos_token_id": eos,
    }


def eagle3_weights(p: Eagle3Preset, target: Preset, used: torch.Tensor, vocab: int,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights (norms near 1) under the published names; `used`: the draft
    vocabulary's target ids, sorted, which d2t and t2d encode."""
    normal, ones = _random_init(seed, getattr(torch, target.dtype))
    h, i, vd = target.hidden_size, p.intermediate_size, p.draft_vocab_size
    q, kv = p.num_attention_heads * p.head_dim, p.num_key_value_heads * p.head_dim
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[used] = True
    layer = {"input_layernorm.weight": ones(h), "hidden_norm.weight": ones(h),
             "self_attn.q_proj.weight": normal(q, 2 * h),
             "self_attn.k_proj.weight": normal(kv, 2 * h),
             "self_attn.v_proj.weight": normal(kv, 2 * h),
             "self_attn.o_proj.weight": normal(h, q),
             "post_attention_layernorm.weight": ones(h),
             "mlp.gate_proj.weight": normal(i, h), "mlp.up_proj.weight": normal(i, h),
             "mlp.down_proj.weight": normal(h, i)}
    return {"fc.weight": normal(h, 3 * h), "norm.weight": ones(h),
            "lm_head.weight": normal(vd, h), "d2t": used - torch.arange(vd), "t2d": t2d,
            **{"midlayer." + name: w for name, w in layer.items()}}


def draft_vocabulary(tokenizer, vocab: int, size: int) -> torch.Tensor:
    """The `size` target ids a drafter predicts, sorted, chosen as the EAGLE authors do
    (the most frequent tokens of the training data): the special tokens (every chat turn
    has them), then the training text's tokens by count, then the lowest unused ids."""
    counts = torch.bincount(torch.tensor(tokenizer.encode(_CORPUS)), minlength=vocab)
    counts[tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)] = counts.max() + 1
    # stable sort: equal counts (the unused ids' zeros) keep ascending id order
    return torch.sort(counts, descending=True, stable=True).indices[:size].sort().values


def _save_hybrid(p: Preset, vocab: int, eos: int, tmp: str) -> None:
    """A transformers Qwen3_5ForCausalLM with its own random initialization, saved as it
    saves itself (so its tensor names and layouts are transformers' by construction)."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
    cfg = Qwen3_5TextConfig(
        vocab_size=vocab, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers, num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads, head_dim=p.head_dim,
        max_position_embeddings=p.max_position_embeddings,
        tie_word_embeddings=p.tie_word_embeddings, eos_token_id=eos, bos_token_id=None,
        **p.hybrid)
    cfg.architectures = ["Qwen3_5ForCausalLM"]
    _seeded_init(Qwen3_5ForCausalLM, cfg, p.dtype).save_pretrained(tmp)


def _save_vl(p: Preset, vocab: int, eos: int, tmp: str, vision_ids: list[int]) -> None:
    """A transformers Qwen3VLForConditionalGeneration with its own random initialization,
    and the preprocessor_config.json of its image processor."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    vision = dict(p.vision)
    section = vision.pop("mrope_section")
    text = dict(vocab_size=vocab, hidden_size=p.hidden_size,
                intermediate_size=p.intermediate_size, num_hidden_layers=p.num_hidden_layers,
                num_attention_heads=p.num_attention_heads,
                num_key_value_heads=p.num_key_value_heads, head_dim=p.head_dim,
                max_position_embeddings=p.max_position_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                 "mrope_section": section, "mrope_interleaved": True})
    start, image, end = vision_ids
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=image,
                        vision_start_token_id=start, vision_end_token_id=end,
                        eos_token_id=eos, tie_word_embeddings=p.tie_word_embeddings)
    cfg.architectures = ["Qwen3VLForConditionalGeneration"]
    _seeded_init(Qwen3VLForConditionalGeneration, cfg, p.dtype).save_pretrained(tmp)
    factor = vision["patch_size"] * vision["spatial_merge_size"]
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "Qwen2VLImageProcessor",
                   "patch_size": vision["patch_size"],
                   "temporal_patch_size": vision["temporal_patch_size"],
                   "merge_size": vision["spatial_merge_size"],
                   "min_pixels": 4 * factor * factor, "max_pixels": 1024 * factor * factor,
                   "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, f, indent=2)


def _seeded_init(model_cls, cfg, dtype: str):
    """transformers' own random initialization of `model_cls(cfg)`, the same on every
    machine (seed 0), leaving the caller's random state as it was."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        return model_cls(cfg).to(getattr(torch, dtype))
    finally:
        torch.random.set_rng_state(state)
