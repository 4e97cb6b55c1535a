"""`fullgraph` command line: generate, serve, bench, selftest."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

from fullgraph.entrypoints.cli_args import add_engine_args, engine_args_from


def cmd_generate(ns: argparse.Namespace) -> int:
    from fullgraph.entrypoints.llm import LLM
    from fullgraph.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(**dataclasses.asdict(engine_args_from(ns)))
    t_load = time.perf_counter() - t0
    params = SamplingParams(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                            seed=ns.sampling_seed, max_tokens=ns.max_tokens,
                            ignore_eos=ns.ignore_eos)
    prompts = ns.prompt or ["Once upon a time"]
    if ns.chat:
        prompts = [{"prompt_token_ids": llm.engine.apply_chat_template(
            [{"role": "user", "content": p}])} for p in prompts]
    t1 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t1
    n_out = 0
    for prompt, out in zip(ns.prompt or prompts, outputs):
        c = out.outputs[0]
        n_out += len(c.token_ids)
        print(f"--- prompt: {prompt!r}")
        print(c.text)
        print(f"--- {len(out.prompt_token_ids)} prompt tokens, {len(c.token_ids)} generated, "
              f"finish_reason={c.finish_reason}")
    print(f"load {t_load:.2f} s, generate {elapsed:.3f} s, {n_out / max(elapsed, 1e-9):.1f} "
          f"tokens/s on {llm.engine.config.device}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fullgraph", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for prompts")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    gen.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=cmd_generate)

    from fullgraph.entrypoints.server.cli import register as register_serve
    register_serve(sub)

    from fullgraph.entrypoints.bench.cli import register as register_bench
    register_bench(sub)

    from fullgraph.entrypoints import selftest
    st = sub.add_parser("selftest", help="check that CUDA-graph replay matches eager execution")
    selftest.add_args(st)
    st.set_defaults(func=selftest.main)

    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return ns.func(ns)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
