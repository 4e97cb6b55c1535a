"""`fullgraph` command line: generate, serve, bench, selftest.

A subcommand's module is imported only when that subcommand runs (or prints its help):
`fullgraph serve` never imports the benchmarks' HTTP client, and `fullgraph --help` imports
no subcommand at all.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import sys
from dataclasses import dataclass

from fullgraph import __version__
from fullgraph.logger import LEVELS, configure_logging, parse_level


@dataclass(frozen=True, slots=True)
class Command:
    module: str
    help: str
    add_args: str = "add_args"      # the module's function that adds its flags to a parser
    main: str = "main"              # the module's function that runs it: main(ns) -> exit code

    def install(self, parser: argparse.ArgumentParser) -> None:
        module = importlib.import_module(self.module)
        getattr(module, self.add_args)(parser)
        parser.set_defaults(func=getattr(module, self.main))


COMMANDS: dict[str, Command | dict[str, Command]] = {
    "generate": Command("fullgraph.entrypoints.generate", "generate text for prompts"),
    "serve": Command("fullgraph.entrypoints.server.cli", "serve an OpenAI-compatible API",
                     add_args="add_serve_args"),
    "bench": {
        "latency": Command("fullgraph.entrypoints.bench.latency",
                           "decode ms/step and TTFT, eager vs CUDA graphs"),
        "throughput": Command("fullgraph.entrypoints.bench.throughput",
                              "offline output tokens/s on a mixed-length workload"),
        "serve": Command("fullgraph.entrypoints.bench.serve",
                         "load generator for a running OpenAI-compatible server"),
        "encoder": Command("fullgraph.entrypoints.bench.encoder",
                           "vision encoder latency over mixed image sizes, eager vs graphs"),
    },
    "selftest": Command("fullgraph.entrypoints.selftest",
                        "check that CUDA-graph replay matches eager execution"),
}
_GROUP_HELP = {"bench": "benchmarks (JSON + PNG)"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help shows its default, also flags without a help text (argparse skips
    those), once: not where the help states it, nor a default of None."""

    def add_argument(self, action: argparse.Action) -> None:
        if (action.help is None and action.option_strings
                and action.default not in (None, argparse.SUPPRESS)):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        super().add_argument(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _log_level(text: str) -> str:
    try:
        parse_level(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _chosen(argv: list[str]) -> tuple[str, ...]:
    """The subcommand path named in argv (("bench", "latency"), ("serve",), or ())."""
    for i, token in enumerate(argv):
        entry = COMMANDS.get(token)
        if isinstance(entry, Command):
            return (token,)
        if isinstance(entry, dict):
            kind = next((t for t in argv[i + 1:] if t in entry), None)
            return (token, kind) if kind else (token,)
    return ()


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with flags only for the subcommand `argv` names (all of them if None)."""
    chosen = None if argv is None else _chosen(argv)
    level_help = f"logging level of fullgraph's messages ({', '.join(LEVELS)})"
    common = argparse.ArgumentParser(add_help=False)      # --log-level after the subcommand
    common.add_argument("--log-level", type=_log_level, default=argparse.SUPPRESS,
                        help=level_help)
    parser = argparse.ArgumentParser(prog="fullgraph", description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--log-level", type=_log_level, default="info", help=level_help)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, entry in COMMANDS.items():
        if isinstance(entry, Command):
            p = sub.add_parser(name, help=entry.help, description=entry.help, parents=[common],
                               formatter_class=HelpFormatter)
            if chosen is None or chosen == (name,):
                entry.install(p)
            continue
        group = sub.add_parser(name, help=_GROUP_HELP[name], parents=[common],
                               formatter_class=HelpFormatter)
        kinds = group.add_subparsers(dest=name, required=True, metavar="KIND")
        for kind, cmd in entry.items():
            p = kinds.add_parser(kind, help=cmd.help, description=cmd.help, parents=[common],
                                 formatter_class=HelpFormatter)
            if chosen is None or chosen == (name, kind):
                cmd.install(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ns = build_parser(argv).parse_args(argv)
    configure_logging(ns.log_level)
    try:
        return ns.func(ns)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
