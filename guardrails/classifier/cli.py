"""`guardtune guard train`: train the input classifier from the seeds in the repository.
`guardtune guard calibrate`: set a head's threshold on a deployment's own benign traffic."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

from guardrails.classifier import calibrate
from guardrails.classifier.data import SEEDS
from guardrails.classifier.head import CARD, COMMITTED
from guardrails.classifier.model import Classifier
from guardrails.classifier.settings import TrainConfig
from kernel.errors import GuardtuneError
from kernel.paths import cache_root


def add_arguments(sub) -> None:
    p = sub.add_parser("guard", help="the input classifier behind moderation")
    actions = p.add_subparsers(dest="action", required=True)
    t = actions.add_parser("train", help="train the classifier head from the seed rows; print its test table")
    t.add_argument("--out", type=Path, help="head directory (default: the user cache, keyed by data and "
                                            "settings; an existing one is reused)")
    t.add_argument("--seeds", type=Path, default=SEEDS, help="directory of seed *.jsonl files")
    t.add_argument("--head", choices=("mlp", "logreg"), default="mlp")
    t.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    t.add_argument("--slice", type=int, metavar="N", help="at most N seeds per split, language and category "
                                                        "(a quick retrain)")
    t.add_argument("--no-second", action="store_true", help="the USE head alone, without the second-opinion head "
                                                          "over e5 vectors (e5 embeds every training window: about "
                                                          "one to two hours on 2 cores the first time, then "
                                                          "cached)")
    t.add_argument("--no-neighbours", action="store_true", help="the heads' scores alone, not blended with "
                                                                 "nearness to the train split's attacks")
    t.add_argument("--lines", action="store_true", help="read each line of a multi-line text alone too, counting "
                                                         "less (held-out recall up, latency and public catch rate at "
                                                         "the threshold down: docs/guardrails.md)")
    t.add_argument("--force", action="store_true", help="retrain even when the cached head exists")
    t.set_defaults(fn=run)
    c = actions.add_parser("calibrate", help="set the head's threshold on your own benign traffic (a copy of "
                                             "the head, for moderation.classifier_dir)")
    c.add_argument("traffic", type=Path, help='benign messages: a .jsonl file with a "text" per line (or what '
                                              "`guardtune audit --json` prints), or a text file with one message "
                                              "per line")
    c.add_argument("--out", type=Path, required=True, help="directory for the calibrated head")
    c.add_argument("--head", type=Path, help="the head to calibrate (default: the committed one)")
    c.add_argument("--fpr", type=float, default=TrainConfig.fpr,
                   help="share of the messages that may be flagged (default: %(default)s)")
    c.set_defaults(fn=run_calibrate)


def _cache_dir(cfg: TrainConfig, seeds: Path) -> Path:
    h = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode())
    for f in sorted(seeds.glob("*.jsonl")):
        h.update(f.name.encode() + f.read_bytes())
    return cache_root() / "classifier" / h.hexdigest()[:16]


def run(args: argparse.Namespace) -> int:
    from guardrails.classifier.train import summary, train  # lazy: loads sklearn (1 s on every guardtune command)

    if args.epochs < 1 or (args.slice is not None and args.slice < 1):
        raise GuardtuneError("--epochs and --slice take a positive number")
    cfg = TrainConfig(head=args.head, epochs=args.epochs, per_group=args.slice, second=not args.no_second,
                      neighbours=not args.no_neighbours, lines=args.lines)
    out = args.out or _cache_dir(cfg, args.seeds)
    if (out / CARD).exists() and args.out is None and not args.force:
        print(f"reusing {out} (--force retrains)", file=sys.stderr)
        card = json.loads((out / CARD).read_text(encoding="utf-8"))
    else:
        card = train(cfg, out, args.seeds, log=lambda m: print(m, file=sys.stderr))
    print(summary(card))
    print(out)
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    calibrate.check_fpr(args.fpr)
    if args.out.resolve() == (args.head or COMMITTED).resolve():
        raise GuardtuneError("--out is the head being calibrated: write the calibrated copy elsewhere")
    clf = Classifier.load(args.head)
    texts = calibrate.read_traffic(args.traffic)
    calibrated = calibrate.calibrate(clf, texts, args.fpr, args.traffic.name, log=lambda m: print(m, file=sys.stderr))
    card = calibrate.save(calibrated, args.out)
    print(calibrate.describe(card))
    print(args.out)
    return 0
