"""`fullgraph generate`: generate text for a few prompts with the offline API."""
from __future__ import annotations

import argparse
import dataclasses
import time

from fullgraph.entrypoints.cli_args import add_engine_args, engine_args_from


def add_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", action="append",
                   help="a prompt (repeat for several; default: 'Once upon a time')")
    g.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    g.add_argument("--image", action="append", metavar="PATH",
                   help="an image file for every prompt, before its text (repeat for several; "
                        "vision-language models, e.g. tiny-qwen3-vl)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1, help="-1 = off")
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="print each generated token's logprob, with the K most likely "
                        "tokens' (0: the sampled token's alone)")


def main(ns: argparse.Namespace) -> int:
    from fullgraph.entrypoints.llm import LLM
    from fullgraph.sampling_params import SamplingParams

    # the sampling flags are checked before the model loads, which takes seconds
    params = SamplingParams(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                            seed=ns.sampling_seed, max_tokens=ns.max_tokens,
                            ignore_eos=ns.ignore_eos, n=ns.n, logprobs=ns.logprobs)
    t0 = time.perf_counter()
    llm = LLM(**dataclasses.asdict(engine_args_from(ns)))
    t_load = time.perf_counter() - t0
    texts = ns.prompt or ["Once upon a time"]
    images = ns.image or []
    parts = [{"type": "image_url", "image_url": {"url": path}} for path in images]
    prompts = texts
    if ns.chat or images:
        prompts = []
        for text in texts:
            if ns.chat:
                content = parts + [{"type": "text", "text": text}] if parts else text
                ids, imgs = llm.engine.chat_prompt([{"role": "user", "content": content}])
            else:   # the images' placeholders, then the prompt's own tokens
                ids = llm.engine.image_placeholders(len(images)) + llm.engine.tokenize(text)
                imgs = images
            prompts.append({"prompt_token_ids": ids} if not imgs else
                           {"prompt_token_ids": ids, "multi_modal_data": {"image": imgs}})
    t1 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t1
    n_out = 0
    for prompt, out in zip(texts, outputs):
        print(f"--- prompt: {prompt!r}")
        for c in out.outputs:
            n_out += len(c.token_ids)
            if ns.n > 1:
                print(f"--- sample {c.index}")
            print(c.text)
            if c.logprobs is not None:
                print_logprobs(c.token_ids, c.logprobs)
            print(f"--- {len(out.prompt_token_ids)} prompt tokens, {len(c.token_ids)} "
                  f"generated, finish_reason={c.finish_reason}")
    print(f"load {t_load:.2f} s, generate {elapsed:.3f} s, {n_out / max(elapsed, 1e-9):.1f} "
          f"tokens/s on {llm.engine.config.device}")
    stats = llm.engine.stats
    if stats.spec_num_drafts:
        print(f"speculative decoding: {stats.spec_num_accepted_tokens} of "
              f"{stats.spec_num_draft_tokens} draft tokens accepted, mean accepted length "
              f"{1 + stats.spec_num_accepted_tokens / stats.spec_num_drafts:.2f}")
    return 0


def print_logprobs(token_ids: list[int], logprobs: list[dict]) -> None:
    """A line per generated token: its id, text and logprob, then the most likely ones'."""
    for tid, entry in zip(token_ids, logprobs):
        sampled = entry[tid]
        others = "  ".join(f"{e.decoded_token!r} {e.logprob:.4f}"
                           for t, e in sorted(entry.items(), key=lambda kv: kv[1].rank)
                           if t != tid)
        print(f"  {tid:>7} {sampled.decoded_token!r:>14} {sampled.logprob:.6f}"
              + (f"   | {others}" if others else ""))
