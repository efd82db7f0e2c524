"""`guardtune rag ingest DIR --index NAME` and `guardtune rag eval --index NAME --questions FILE`.

An index name without a slash means `indexes/<NAME>` under the current directory. Progress goes to
stderr, the summary to stdout. `python -m rag.cli ingest ...` runs the same commands on their own.
Ingest screens every chunk with the serving pipeline's prompt-injection scanner unless --no-screen.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from guardrails.classifier.categories import ATTACKS
from guardrails.scanners.classifier import ContentClassifier
from guardrails.scanners.injection import Injection
from guardrails.scanners.normalise import Normalise
from kernel.cli_util import run_cli


def index_path(name: str) -> Path:
    return Path("indexes") / name if "/" not in name and name not in (".", "..") else Path(name)


class InjectionScreen:
    """A chunk as the input guardrails see a user turn: normalised, then checked for prompt injection
    and jailbreak by the patterns and the classifier. Other categories are left alone: a knowledge
    base may well discuss fraud or violence.

    Retrieved text reaches the prompt after those guardrails ran, so this is its only check.
    """

    name = "prompt_injection+classifier"  # recorded in meta.json; another screen re-screens unchanged documents

    def __init__(self) -> None:
        self.normalise, self.injection, self.classifier = Normalise(), Injection(), ContentClassifier()

    def __call__(self, text: str) -> str | None:
        clean = self.normalise.scan(text).text
        if not (verdict := self.injection.scan(clean)).valid:
            return verdict.reason
        flags = [c for c in self.classifier.scan(clean).flags if c in ATTACKS]
        return f"classifier: {', '.join(flags)}" if flags else None


def add_arguments(sub) -> None:
    p = sub.add_parser("rag", help="knowledge-base retrieval: ingest documents into an index, measure recall")
    _add_actions(p)


def _add_actions(p: argparse.ArgumentParser) -> None:
    from rag.index import HNSW_THRESHOLD, INDEX_TYPES

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
    e = actions.add_parser("eval", help="recall@k and MRR of an index on a JSONL question set")
    e.add_argument("--index", required=True, metavar="NAME_OR_DIR")
    e.add_argument("--questions", required=True, metavar="FILE",
                   help='JSONL rows {"question": ..., "source": "<relative path of the answering document>"}')
    e.add_argument("--k", type=int, default=10)
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    return _ingest(args) if args.action == "ingest" else _eval(args)


def _ingest(args: argparse.Namespace) -> int:
    from rag.index import ingest

    report = ingest(args.dir, index_path(args.index), index_type=args.index_type, chunk_tokens=args.chunk_tokens,
                    overlap=args.overlap, screen=None if args.no_screen else InjectionScreen(),
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    print(report.summary())
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rag.evaluate import load_questions, recall_at_k
    from rag.index import KnowledgeIndex

    path = index_path(args.index)
    index, questions = KnowledgeIndex.load(path), load_questions(args.questions)
    report = recall_at_k(index, questions, args.k)
    for miss in report["misses"]:
        print(f"miss: {miss['question']!r} wants {miss['source']}, top hit {miss['top']}")
    scores = "  ".join(f"{key} {value:.3f}" for key, value in report.items() if key.startswith("recall@"))
    print(f"rag eval: {report['questions']} questions on {path}: {scores}  MRR {report['mrr']:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rag.cli", description="Knowledge-base retrieval with citations.")
    _add_actions(parser)
    return run_cli(lambda: run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
