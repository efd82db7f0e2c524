"""`train CONFIG.yaml [key=value ...]`: the training entry point."""

from __future__ import annotations

import argparse
import sys

from kernel import __version__
from kernel.cli_util import run_cli
from training.config import TrainConfig, load_config
from training.distributed import launch
from training.host_memory import prepare_process_env


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (keys: see `train --keys`)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. method=qlora max_steps=20")
    p.add_argument("--skip-bad-rows", action="store_true", help="count and skip malformed data rows instead of failing")
    p.add_argument("--keys", action="store_true", help="list config keys with defaults and exit")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--dry-run", action="store_true", help="print the launch command per node and check the "
                   "distributed settings, without training")


def run(args: argparse.Namespace) -> int:
    prepare_process_env()  # before anything imports torch; both `train` and `guardtune train` come here
    if args.keys:
        for name, field in TrainConfig.model_fields.items():
            default = "(required)" if field.is_required() else repr(field.default)
            print(f"{name:24} {default:24} {field.description or ''}")
        return 0
    overrides = list(args.overrides)
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        overrides.insert(0, args.config)  # `train key=value ...` with no file
        args.config = None
    if args.skip_bad_rows:
        overrides.append("skip_bad_rows=true")
    if args.dry_run:
        overrides.append("dry_run=true")
    cfg = load_config(args.config, overrides)
    if launch.wanted(cfg):  # several processes: torchrun starts ranks that re-run this CLI
        code = launch.launch(cfg, args.config, overrides, log=lambda msg: print(msg, file=sys.stderr, flush=True))
        if not cfg.dry_run:
            print(cfg.adapter_dir)
        return code
    from training.entry import train  # lazy: loads torch and the trainers, only when this process trains

    train(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(cfg.adapter_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="train", description="Fine-tune a base chat model into a PEFT adapter with a guardtune manifest.")
    add_arguments(p)
    return run_cli(lambda: run(p.parse_intermixed_args(argv)))  # flags may come between key=value overrides


if __name__ == "__main__":
    sys.exit(main())
