"""`guardtune`: the umbrella CLI. Each subcommand lives with the package that owns it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from guardrails import audit_cli, scripts_cli
from guardrails.classifier import cli as guard_cli
from guardrails.ingest_screen import InjectionScreen
from guardtune import __version__, demo
from jobs import cli as platform_cli
from kernel.cli_util import run_cli
from kernel.models import resolve_base_model, weights_sha256
from rag import cli as rag_cli
from serving import cli as serving_cli
from training import cli as train_cli
from training import estimate
from training.export import merge


def _export(args: argparse.Namespace) -> int:
    merge(args.adapter, args.merge)
    print(args.merge)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_cli  # lazy: loads torch

    return evaluate_cli(args)


def _base(args: argparse.Namespace) -> int:
    path = resolve_base_model(args.name, log=lambda m: print(m, file=sys.stderr))
    print(f"{path}\nsha256 {weights_sha256(path)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="guardtune", description="Fine-tune, guard and serve chat models.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_training_commands(sub)
    _add_serving_commands(sub)
    scripts_cli.add_arguments(sub)
    audit_cli.add_arguments(sub)
    guard_cli.add_arguments(sub)
    rag_cli.add_arguments(sub, screen=InjectionScreen)
    _add_front_door_commands(sub)
    return p


def _command(sub: argparse._SubParsersAction, name: str, help_text: str,
             add_arguments: Callable[[argparse.ArgumentParser], None], fn: Callable[[argparse.Namespace], int]) -> None:
    """A subcommand whose arguments and handler live with the package that owns it."""
    p = sub.add_parser(name, help=help_text)
    add_arguments(p)
    p.set_defaults(fn=fn)


def _add_training_commands(sub: argparse._SubParsersAction) -> None:
    _command(sub, "train", "train an adapter (same as the `train` command)", train_cli.add_arguments, train_cli.run)

    e = sub.add_parser("export", help="write a merged full model from an adapter")
    e.add_argument("adapter")
    e.add_argument("--merge", required=True, metavar="OUT", help="output directory for the merged model")
    e.set_defaults(fn=_export)

    v = sub.add_parser("eval", help="loss, perplexity, BLEU/ROUGE and sample replies of an adapter on held-out "
                                    "rows; or --forgetting ADAPTER: base vs adapter on a general set")
    v.add_argument("adapter", nargs="?", help="adapter dir (with --forgetting: the general set, optional)")
    v.add_argument("data", nargs="?", help="JSONL in the training shapes")
    v.add_argument("--max-rows", type=int, default=200)
    v.add_argument("--samples", type=int, default=3, help="generation samples to print")
    v.add_argument("--gen-rows", type=int, default=50, help="rows whose greedy replies get BLEU/ROUGE (0: none)")
    v.add_argument("--max-new-tokens", type=int, default=64, help="length cap of greedy replies")
    v.add_argument("--batch-size", type=int, default=8, help="generation batch size")
    v.add_argument("--forgetting", metavar="ADAPTER",
                   help="compare base and ADAPTER on a general set (default examples/data/general_eval.jsonl)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(fn=_eval)

    _command(sub, "estimate", "predict peak training memory per device: weights, gradients, optimizer, activations, "
             "runtime", estimate.add_arguments, estimate.run)


def _add_serving_commands(sub: argparse._SubParsersAction) -> None:
    _command(sub, "serve", "OpenAI-compatible chat server over vLLM", serving_cli.add_serve_arguments,
             serving_cli.serve)
    _command(sub, "adapters", "list, swap or remove a running server's task adapters",
             serving_cli.add_adapters_arguments, serving_cli.adapters)


def _add_front_door_commands(sub: argparse._SubParsersAction) -> None:
    _command(sub, "demo", "train, build the stores, serve, and play a guarded conversation (README's first command)",
             demo.add_arguments, demo.run)

    b = sub.add_parser("base", help="resolve (and materialise) a base model; print its directory and hash")
    b.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    b.set_defaults(fn=_base)

    _command(sub, "platform", "the training platform: submit, queue, watch and promote train jobs (API and page)",
             platform_cli.add_arguments, platform_cli.run)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run_cli(lambda: (lambda a: a.fn(a))(parse(parser, argv)))


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """key=value overrides may also come after flags (`estimate CONFIG --device cpu rank=8`), as
    `train` allows; argparse's intermixed parsing does not work with subcommands."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


if __name__ == "__main__":
    sys.exit(main())
