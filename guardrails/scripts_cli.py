"""`guardtune scripts build LIBRARY --out STORE`: (re)build the approved-script store."""

from __future__ import annotations

import argparse
import sys

from guardrails.scripts import build_store


def add_arguments(sub) -> None:
    p = sub.add_parser("scripts", help="approved-script store for output compliance")
    actions = p.add_subparsers(dest="action", required=True)
    b = actions.add_parser("build", help="embed a script library (YAML/JSON) into a FAISS store")
    b.add_argument("library")
    b.add_argument("--out", required=True, help="store directory (written atomically)")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    build_store(args.library, args.out, log=lambda m: print(m, file=sys.stderr))
    print(args.out)
    return 0
