"""`guardtune platform`: the training platform's server (API and page)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from jobs.app import Settings, create_app
from jobs.promote import GatePolicy


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=Path, default=Path("."), help="config paths are relative to it; jobs/, runs/ "
                   "and adapters/ go under it (default: the current directory)")
    p.add_argument("--store", default="", help="job store: a SQLite file (default WORKDIR/platform.db) or a "
                   "postgresql:// URL shared by several platform instances")
    p.add_argument("--instance", default="", help="this instance's name in the store (default: the host name); "
                   "keep it across restarts (a container's host name changes), distinct per instance")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--serve-url", help="the guardtune serve that promotions go to, e.g. http://127.0.0.1:8000")
    p.add_argument("--audit-db", help="serving's audit store (SQLite file or postgresql:// URL): the bad-case loop "
                   "turns its recent bad cases into DPO jobs")
    p.add_argument("--max-running", type=int, default=1, help="jobs run at once, memory permitting")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="what the memory estimate assumes")
    p.add_argument("--executor", choices=["local", "kubernetes"], default="local", help="local: subprocesses here; "
                   "kubernetes: a Job or PyTorchJob per job (kubeconfig or in-cluster; the volume mounted at WORKDIR)")
    p.add_argument("--k8s-namespace", default="guardtune")
    p.add_argument("--k8s-image", default="guardtune:cuda")
    p.add_argument("--k8s-pvc", default="guardtune-data", help="the volume holding data, runs and adapters")
    p.add_argument("--k8s-gpus-per-node", type=int, default=0)
    p.add_argument("--swanlab-url", help="a `swanlab watch` dashboard to link each job's run to")
    p.add_argument("--max-eval-loss", type=float, help="eval gate: refuse a promotion above this eval loss")
    p.add_argument("--max-ppl-ratio", type=float, default=2.0, help="eval gate: general-set perplexity limit vs base")
    p.add_argument("--require-forgetting", action="store_true", help="eval gate: refuse adapters without the check")
    p.add_argument("--replay-rows", type=int, default=20, help="eval gate: recent guarded requests of the task sent "
                   "again with the candidate (needs --audit-db; 0: none)")
    p.add_argument("--max-guard-increase", type=float, default=0.1, help="eval gate: how much the share of replies "
                   "the guard acts on may grow in the replay")


def settings_from(args: argparse.Namespace) -> Settings:
    """Keys come from the environment: GUARDTUNE_ADMIN_KEY for this API, GUARDTUNE_SERVE_ADMIN_KEY for serving's."""
    return Settings(workdir=args.workdir, store=args.store, instance=args.instance, admin_key=os.environ.get("GUARDTUNE_ADMIN_KEY") or None,
                    serve_url=args.serve_url, audit_db=args.audit_db, serve_admin_key=os.environ.get("GUARDTUNE_SERVE_ADMIN_KEY") or None,
                    max_running=args.max_running, device=args.device, swanlab_url=args.swanlab_url,
                    executor=args.executor, k8s={"namespace": args.k8s_namespace, "image": args.k8s_image,
                                                 "pvc": args.k8s_pvc, "gpus_per_node": args.k8s_gpus_per_node},
                    gate=GatePolicy(args.max_eval_loss, args.max_ppl_ratio, args.require_forgetting,
                                    args.replay_rows, args.max_guard_increase))


def run(args: argparse.Namespace) -> int:
    import uvicorn  # the server, only when serving

    uvicorn.run(create_app(settings_from(args)), host=args.host, port=args.port, log_level="info")
    return 0
