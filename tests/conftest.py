"""Shared fixtures: random-weight Hugging Face checkpoints and a reference greedy decoder."""
from __future__ import annotations

import contextlib
import os
import tempfile

import pytest
import torch

# Presets and test checkpoints go to a throwaway cache, never the user's.
os.environ.setdefault("FULLGRAPH_CACHE_DIR", tempfile.mkdtemp(prefix="fullgraph-test-cache-"))

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_hf_checkpoint(path: str, *, tie: bool = True, num_layers: int = 2, seed: int = 0,
                       max_shard_size: str | None = None, dtype=torch.float32,
                       init_range: float = 0.2) -> str:
    """A random-weight transformers Qwen3ForCausalLM saved with save_pretrained."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from fullgraph.models.presets import train_tokenizer

    tok = train_tokenizer(1024)
    tok.save_pretrained(path)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=1024, rope_theta=10000.0,
                      tie_word_embeddings=tie, initializer_range=init_range,
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    cfg.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def make_hybrid_checkpoint(path: str, architecture: str = "Qwen3_5ForCausalLM", *,
                           num_layers: int = 4, seed: int = 0, dtype=torch.float32,
                           **overrides) -> str:
    """A random-weight transformers hybrid (Gated DeltaNet + gated attention) model saved with
    save_pretrained: Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM or Qwen3NextForCausalLM. Norm
    weights are randomized too (transformers initializes the (1 + w) norms at w = 0, which
    would hide a missing offset)."""
    import transformers

    from fullgraph.models.presets import train_tokenizer

    tok = train_tokenizer(1024)
    tok.save_pretrained(path)
    config_cls, model_cls = {
        "Qwen3_5ForCausalLM": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM"),
        "Qwen3_5MoeForCausalLM": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM"),
        "Qwen3NextForCausalLM": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),
    }[architecture]
    kwargs = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16,
                  linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                  max_position_embeddings=1024, initializer_range=0.2, tie_word_embeddings=True,
                  eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                   "partial_rotary_factor": 0.25})
    if architecture != "Qwen3_5ForCausalLM":
        kwargs |= dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, norm_topk_prob=True)
    kwargs |= overrides
    cfg = getattr(transformers, config_cls)(**kwargs)
    cfg.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and "linear_attn" not in name:
                p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return path


@pytest.fixture
def hf_gdn_torch_paths(monkeypatch):
    """transformers' pure-torch Gated DeltaNet functions, undecorated, for the reference:
    with fla (the GPU machine carries it) some versions (5.17) hand even CPU tensors to fla,
    and on CUDA its float32 kernels use tf32. Patched where the models look them up."""
    import inspect
    import importlib
    for module in ("qwen3_5", "qwen3_next", "qwen3_5_moe"):
        try:
            mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        except ImportError:
            continue
        for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule",
                     "causal_conv1d_fn", "causal_conv1d_update"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, inspect.unwrap(getattr(mod, name)))


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> str:
    return make_hf_checkpoint(str(tmp_path_factory.mktemp("hf-qwen3")))


@pytest.fixture(scope="session")
def hf_model(hf_dir):
    from transformers import Qwen3ForCausalLM
    return Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with transformers' full forward each step (no cache): the reference."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):]


def graph_input_tensors(runner) -> list[torch.Tensor]:
    """The persistent tensors captured graphs read: they must never be reallocated."""
    b, backend = runner.buffers, runner.backend
    return [b.arena.gpu, b.arena.dev["input_ids"], b.block_table.gpu, backend.block_logical,
            backend.mixed_kv_indices.gpu, backend.doc_ids.gpu, runner.logits, backend.q_pad,
            *(t for layer in runner.kv_caches for t in layer)]


def logprob_errors(outputs, prompts, ref32, ref16) -> tuple[list[float], list[float]]:
    """|our bf16 logprob - transformers' float32| and |transformers' bf16 - float32| for every
    logprob our `outputs` (completions with logprobs of `prompts`) report."""
    ours, theirs = [], []
    for p, o in zip(prompts, outputs):
        ids = torch.tensor([p + o.token_ids], device="cuda")
        with torch.no_grad():
            lp32 = ref32(ids).logits[0].float().log_softmax(-1)
            lp16 = ref16(ids).logits[0].float().log_softmax(-1)
        for step, entry in enumerate(o.logprobs):
            row = len(p) - 1 + step
            for tid, logprob in entry.items():
                ours.append(abs(logprob.logprob - lp32[row, tid].item()))
                theirs.append(abs(lp16[row, tid].item() - lp32[row, tid].item()))
    return ours, theirs


@contextlib.contextmanager
def served(engine, **app_kwargs):
    """The OpenAI server over `engine` (an AsyncLLMEngine), uvicorn in a thread of this
    process: yields its base URL; stops the server and the engine after."""
    import socket
    import threading
    import time

    import uvicorn

    from fullgraph.entrypoints.server.app import build_app
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(engine, **app_kwargs), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 30
        while not server.started and time.monotonic() < end:
            time.sleep(0.05)
        assert server.started, "in-process server did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        engine.shutdown()


def one_request_inputs(n: int, positions, slot_mapping, seq_lens, query_start_loc,
                       block_table):
    """StepAttentionInputs of one request's `n` tokens over the given (CPU) buffers: the
    test harnesses that drive a model's forward by hand."""
    from fullgraph.attention.metadata import StepAttentionInputs
    return StepAttentionInputs(
        num_reqs=1, num_tokens=n, num_reqs_padded=1, num_tokens_padded=n,
        uniform_query_len=n, positions=positions[:n], slot_mapping=slot_mapping[:n],
        seq_lens=seq_lens, query_start_loc=query_start_loc, block_table=block_table,
        positions_cpu=positions.numpy(), seq_lens_cpu=seq_lens.numpy(),
        query_start_loc_cpu=query_start_loc.numpy(), block_table_cpu=block_table.numpy())


def churn_with_aborts(engine, make_prompt, make_params, n: int, step_every: int, rng) -> None:
    """Add `n` requests (`make_params(i)`, then `make_prompt()`), stepping every `step_every`
    additions and aborting a random live request every fifth, then run the rest to the end:
    what leak tests check the pools after."""
    for i in range(n):
        params = make_params(i)
        engine.add_request(f"r{i}", make_prompt(), params)
        if i % step_every == 0:
            engine.step()
        if i % 5 == 0 and engine.requests:
            engine.abort_request(rng.choice(list(engine.requests)))
    while engine.has_unfinished_requests():
        engine.step()
