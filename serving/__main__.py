"""`python -m serving --config serve.yaml`: the server alone, without the guardtune front door (the launcher uses it)."""

import argparse
import sys

from kernel.cli_util import run_cli
from serving.cli import add_serve_arguments, serve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving", description="OpenAI-compatible chat server over vLLM")
    add_serve_arguments(p)
    args = p.parse_args(argv)
    return run_cli(lambda: serve(args))


if __name__ == "__main__":
    sys.exit(main())
