"""Target/drafter checkpoint pairs with a known agreement, for speculative-decoding tests and
benchmarks (`python tests/spec_pairs.py --source qwen3-0.6b-random --disagree 0.3 --out DIR`
writes DIR/target and DIR/drafter: drafts accepted ~70% of the time under greedy decoding).

The target is tiny-qwen3 with its layers' output projections zeroed (`o_proj`, `down_proj`)
and an untied random LM head: every layer adds nothing, so its next token depends on the
current token alone, next(x) = argmax lm_head(norm(embed(x))), a random function of x (a
bigram model; greedy text walks its functional graph).

The EAGLE-3 drafter is built to compute the same function: fc and the hidden norm are zero
(with `norm_before_residual` the residual is then zero too), q and k are a large constant
bias, so after RoPE every row attends to its own position only, v and o copy the normed token
embedding through, the MLP adds nothing, and the LM head is the target's (its rows of the
draft vocabulary, when the drafter has a smaller one). A row carrying token x then proposes
next(x), the target's own choice. `disagree` of the draft vocabulary's
ids are then mapped to other target ids (`d2t`): drafts of those tokens are wrong.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from fullgraph.models.presets import resolve_model_path


def bigram_target(path: str, seed: int = 1234, source: str = "tiny-qwen3",
                  draft_vocab: int | None = None, mix: float = 0.0) -> str:
    """A Qwen3 preset or checkpoint directory (`source`: dense, hybrid Qwen3.5 or
    vision-language) made a bigram model, written to `path` (`seed`: its LM head; not the
    preset's own seed, whose first draws are the embedding). Zeroed projections cost what
    real ones do, so it times like the source. With `draft_vocab`, only the first
    `draft_vocab` ids have LM head rows (the others score 0, below the best of those): next()
    stays among them, where a drafter with that draft vocabulary looks.

    `mix` scales the text layers' token-mixing outputs (attention's o_proj, Gated DeltaNet's
    out_proj) instead of zeroing them: the next token is then the bigram's choice except
    where the history tips it, through the attention's K/V at their rotary positions and the
    GDN states (an agreeing drafter is accepted often, not always; a wrong position or a
    state that kept a rejected draft changes the output)."""
    src = resolve_model_path(source)
    shutil.copytree(src, path, dirs_exist_ok=True)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["tie_word_embeddings"] = False
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    text = cfg.get("text_config", cfg)
    w = load_file(os.path.join(path, "model.safetensors"))
    for name in w:
        if "visual." in name:
            continue
        if name.endswith("down_proj.weight"):
            w[name] = torch.zeros_like(w[name])
        elif name.endswith(("self_attn.o_proj.weight", "linear_attn.out_proj.weight")):
            w[name] = w[name] * mix
    g = torch.Generator().manual_seed(seed)
    head = torch.randn(text["vocab_size"], text["hidden_size"], generator=g)
    # unit rows: no token's row outweighs the others', so next() spreads over the vocabulary
    head = head / head.norm(dim=1, keepdim=True) * 4
    if draft_vocab is not None:
        head[draft_vocab:] = 0
    w["lm_head.weight"] = head
    save_file(w, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def agreeing_drafter(path: str, target: str, disagree: float = 0.0, seed: int = 0,
                     focus: float = 20.0, draft_vocab: int | None = None,
                     head_dim: int | None = None) -> str:
    """An EAGLE-3 drafter for `bigram_target(target)` that proposes the target's next token,
    except for a `disagree` fraction of the vocabulary. `focus` is the q and k bias: at 20 a
    row attends to itself alone; small, it also reads its neighbours (drafts then depend on
    the K/V at earlier positions, and so on where each row's K/V went). `draft_vocab`: the
    drafter's vocabulary is the target's first ids (a target made with the same
    `draft_vocab`), as published EAGLE-3 drafters have 32k of a large vocabulary.
    `head_dim`: the drafter's head size (default min(64, hidden / 4))."""
    with open(os.path.join(target, "config.json")) as f:
        config = json.load(f)
    t = config.get("text_config", config)
    h, v = t["hidden_size"], t["vocab_size"]
    vd = v if draft_vocab is None else draft_vocab
    # the hybrids' RMSNorms scale by (1 + w)
    norm_offset = 1.0 if config["architectures"][0].startswith(("Qwen3_5", "Qwen3Next")) else 0.0
    d = head_dim or min(64, h // 4)
    heads = h // d
    os.makedirs(path, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
              "num_hidden_layers": 1, "hidden_size": h, "intermediate_size": 2 * h,
              "head_dim": d, "num_attention_heads": heads, "num_key_value_heads": heads,
              "hidden_act": "silu", "attention_bias": True, "rms_norm_eps": 1e-6,
              "rope_theta": t.get("rope_theta", 1e6), "max_position_embeddings":
              t["max_position_embeddings"], "vocab_size": v, "draft_vocab_size": vd,
              "eagle_aux_hidden_state_layer_ids": [0, 1, 1], "norm_before_residual": True,
              "tie_word_embeddings": False, "torch_dtype": "float32"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    tw = load_file(os.path.join(target, "model.safetensors"))
    final_norm = tw.get("model.norm.weight", tw.get("model.language_model.norm.weight"))
    g = torch.Generator().manual_seed(seed)
    wrong = torch.randperm(vd, generator=g)[:int(disagree * vd)]
    targets = torch.arange(vd)
    targets[wrong] = wrong.roll(1)              # a cycle among them: every one moves
    eye = torch.eye(h)
    w = {"d2t": targets - torch.arange(vd), "t2d": torch.arange(v) < vd,
         "fc.weight": torch.zeros(h, 3 * h),
         "midlayer.hidden_norm.weight": torch.zeros(h),
         "midlayer.input_layernorm.weight": final_norm + norm_offset,
         "midlayer.post_attention_layernorm.weight": torch.ones(h),
         "midlayer.self_attn.q_proj.weight": torch.zeros(heads * d, 2 * h),
         "midlayer.self_attn.k_proj.weight": torch.zeros(heads * d, 2 * h),
         "midlayer.self_attn.v_proj.weight": torch.cat([eye, torch.zeros(h, h)], 1),
         "midlayer.self_attn.q_proj.bias": torch.full((heads * d,), focus),
         "midlayer.self_attn.k_proj.bias": torch.full((heads * d,), focus),
         "midlayer.self_attn.v_proj.bias": torch.zeros(heads * d),
         "midlayer.self_attn.o_proj.weight": eye.clone(),
         "midlayer.self_attn.o_proj.bias": torch.zeros(h),
         "midlayer.mlp.gate_proj.weight": torch.zeros(2 * h, h),
         "midlayer.mlp.up_proj.weight": torch.zeros(2 * h, h),
         "midlayer.mlp.down_proj.weight": torch.zeros(h, 2 * h),
         "norm.weight": torch.ones(h), "lm_head.weight": tw["lm_head.weight"][:vd].clone()}
    save_file(w, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def hybrid_pair(root: str, mix: float = 0.02, drafter_head_dim: int | None = None
                ) -> tuple[str, str]:
    """(target, drafter): a random Qwen3.5 checkpoint made `bigram_target(mix=mix)` and its
    agreeing drafter, under `root` (drafts accepted ~60-75% of the time at 0.02)."""
    from conftest import make_hybrid_checkpoint
    source = make_hybrid_checkpoint(os.path.join(root, "source"))
    target = bigram_target(os.path.join(root, "target"), source=source, mix=mix)
    return target, agreeing_drafter(os.path.join(root, "drafter"), target,
                                    head_dim=drafter_head_dim)


def agreeing_eagle1_drafter(path: str, target: str) -> str:
    """An EAGLE-1 drafter (vLLM's layout) for `bigram_target(target)` that proposes the
    target's next token: fc scales the token embedding by the target's final norm weight
    (a positive multiple of what the target's LM head reads, so the same argmax), the
    layer's attention and MLP outputs are zero, and the target's LM head makes the logits."""
    with open(os.path.join(target, "config.json")) as f:
        t = json.load(f)
    h = t["hidden_size"]
    os.makedirs(path, exist_ok=True)
    config = {k: t[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                "head_dim", "vocab_size", "max_position_embeddings",
                                "rms_norm_eps", "rope_theta")}
    config.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "num_hidden_layers": 1, "intermediate_size": 2 * h, "hidden_act": "silu",
                   "torch_dtype": "float32"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    tw = load_file(os.path.join(target, "model.safetensors"))
    q = t["num_attention_heads"] * t["head_dim"]
    kv = t["num_key_value_heads"] * t["head_dim"]
    g = torch.Generator().manual_seed(5)
    w = {"fc.weight": torch.cat([torch.diag(tw["model.norm.weight"]), torch.zeros(h, h)], 1),
         "layers.0.self_attn.q_proj.weight": torch.randn(q, h, generator=g),
         "layers.0.self_attn.k_proj.weight": torch.randn(kv, h, generator=g),
         "layers.0.self_attn.v_proj.weight": torch.randn(kv, h, generator=g),
         "layers.0.self_attn.o_proj.weight": torch.zeros(h, q),
         "layers.0.post_attention_layernorm.weight": torch.ones(h),
         "layers.0.mlp.gate_proj.weight": torch.randn(2 * h, h, generator=g),
         "layers.0.mlp.up_proj.weight": torch.randn(2 * h, h, generator=g),
         "layers.0.mlp.down_proj.weight": torch.zeros(h, 2 * h)}
    save_file(w, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="qwen3-0.6b-random",
                    help="a Qwen3 or Qwen3.5 (hybrid) preset or checkpoint directory")
    ap.add_argument("--mix", type=float, default=0.0,
                    help="a hybrid source's Gated DeltaNet output scale (bigram_target)")
    ap.add_argument("--disagree", type=float, default=0.3)
    ap.add_argument("--draft-vocab", type=int, default=32000,
                    help="the drafter's vocabulary (published Qwen3 EAGLE-3 drafters: 32000)")
    ap.add_argument("--out", required=True)
    ns = ap.parse_args()
    tgt = bigram_target(os.path.join(ns.out, "target"), source=ns.source,
                        draft_vocab=ns.draft_vocab, mix=ns.mix)
    print(tgt, agreeing_drafter(os.path.join(ns.out, "drafter"), tgt, ns.disagree,
                                draft_vocab=ns.draft_vocab))
