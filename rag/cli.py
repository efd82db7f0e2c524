"""`guardtune rag ingest DIR --index NAME` and `guardtune rag eval --index NAME --questions FILE`.

An index name without a slash means `indexes/<NAME>` under the current directory. Progress goes to
stderr, the summary to stdout. Ingest screens every chunk unless --no-screen, with the screen the
caller registers these commands with (the front door gives the input guardrails' injection screen).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from rag.evaluate import load_questions, recall_at_k
from rag.index import HNSW_THRESHOLD, INDEX_TYPES, KnowledgeIndex, Screen, ingest


def index_path(name: str) -> Path:
    return Path("indexes") / name if "/" not in name and name not in (".", "..") else Path(name)


def add_arguments(sub, screen: Callable[[], Screen]) -> None:
    """Register `rag ingest` and `rag eval`; `screen()` makes the screen ingest uses without --no-screen."""
    p = sub.add_parser("rag", help="knowledge-base retrieval: ingest documents into an index, measure recall")
    actions = p.add_subparsers(dest="action", required=True)
    i = actions.add_parser("ingest", help="(re)index the .md/.txt/.html files under DIR; unchanged files are kept")
    i.add_argument("dir", metavar="DIR")
    i.add_argument("--index", required=True, metavar="NAME_OR_DIR", help="index name (indexes/NAME) or directory")
    i.add_argument("--index-type", choices=INDEX_TYPES, default="auto",
                   help=f"auto: exact below {HNSW_THRESHOLD:,} chunks, HNSW from there")
    i.add_argument("--chunk-tokens", type=int, default=200, metavar="N", help="chunk size in MiniLM tokens")
    i.add_argument("--overlap", type=int, default=40, metavar="N", help="tokens shared by consecutive chunks")
    i.add_argument("--no-screen", action="store_true",
                   help="index every chunk: skip the prompt-injection screen that quarantines flagged ones")
    i.set_defaults(fn=_ingest, make_screen=screen)
    e = actions.add_parser("eval", help="recall@k and MRR of an index on a JSONL question set")
    e.add_argument("--index", required=True, metavar="NAME_OR_DIR")
    e.add_argument("--questions", required=True, metavar="FILE",
                   help='JSONL rows {"question": ..., "source": "<relative path of the answering document>"}')
    e.add_argument("--k", type=int, default=10)
    e.set_defaults(fn=_eval)


def _ingest(args: argparse.Namespace) -> int:
    report = ingest(args.dir, index_path(args.index), index_type=args.index_type, chunk_tokens=args.chunk_tokens,
                    overlap=args.overlap, screen=None if args.no_screen else args.make_screen(),
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    print(report.summary())
    return 0


def _eval(args: argparse.Namespace) -> int:
    path = index_path(args.index)
    index, questions = KnowledgeIndex.load(path), load_questions(args.questions)
    report = recall_at_k(index, questions, args.k)
    for miss in report["misses"]:
        print(f"miss: {miss['question']!r} wants {miss['source']}, top hit {miss['top']}")
    scores = "  ".join(f"{key} {value:.3f}" for key, value in report.items() if key.startswith("recall@"))
    print(f"rag eval: {report['questions']} questions on {path}: {scores}  MRR {report['mrr']:.3f}")
    return 0
