"""`guardtune serve` and `guardtune adapters` (a thin client of the admin API)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from kernel.errors import GuardtuneError
from kernel.openai_errors import error_message


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="serve config YAML (default: base model + every adapter under adapters/)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--engine", choices=["vllm", "transformers"], help="override the config's engine")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from serving.app import create_app  # lazy: loads fastapi
    from serving.config import load_serve_config  # lazy: loads numpy via guardrails (serving --help)

    cfg = load_serve_config(args.config, host=args.host, port=args.port, engine=args.engine)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("guardtune.serve").info("starting %s engine on %s:%d", cfg.engine, cfg.host, cfg.port)
    from serving.gate import bounded_h11  # lazy: loads fastapi

    # X-Forwarded-For rewrites the client address only from proxies the config names: by default the
    # socket peer is the client, so no header can make a remote caller look local.
    proxies = {"proxy_headers": True, "forwarded_allow_ips": ",".join(cfg.trusted_proxies)} if cfg.trusted_proxies \
        else {"proxy_headers": False}
    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level="info", access_log=False, **proxies,
                timeout_keep_alive=5, timeout_graceful_shutdown=30, http=bounded_h11(cfg.limits.header_timeout_s),
                h11_max_incomplete_event_size=cfg.limits.max_header_bytes)
    return 0


def add_adapters_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("GUARDTUNE_URL", "http://127.0.0.1:8000"))
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="tasks and their adapters")
    put = sub.add_parser("put", help="load an adapter and switch a task to it")
    put.add_argument("task")
    put.add_argument("adapter", help="adapter directory (under the server's adapters root)")
    rm = sub.add_parser("delete", help="stop serving a task")
    rm.add_argument("task")
    canary = sub.add_parser("canary", help="serve a share of a task's sessions with a second adapter")
    canary.add_argument("task")
    canary.add_argument("adapter", help="adapter directory (under the server's adapters root)")
    canary.add_argument("--share", type=float, required=True, help="0..1 of the task's sessions")
    for action, text in (("promote", "the task's canary becomes its adapter"), ("rollback", "stop the task's canary")):
        sub.add_parser(action, help=text).add_argument("task")


def adapters(args: argparse.Namespace) -> int:
    import httpx

    headers = {}
    if key := os.environ.get("GUARDTUNE_ADMIN_KEY"):
        headers["Authorization"] = f"Bearer {key}"
    url = args.url.rstrip("/")
    try:
        with httpx.Client(timeout=120, headers=headers) as client:
            if args.action == "list":
                resp = client.get(f"{url}/admin/tasks")
            elif args.action in ("put", "canary"):
                path = os.path.abspath(args.adapter) if os.path.exists(args.adapter) else args.adapter
                resp = (client.put(f"{url}/admin/tasks/{args.task}", json={"adapter": path}) if args.action == "put"
                        else client.put(f"{url}/admin/tasks/{args.task}/canary",
                                        json={"adapter": path, "share": args.share}))
            elif args.action == "promote":
                resp = client.post(f"{url}/admin/tasks/{args.task}/canary/promote")
            else:
                resp = client.delete(f"{url}/admin/tasks/{args.task}" + ("/canary" if args.action == "rollback" else ""))
    except httpx.HTTPError as exc:
        raise GuardtuneError(f"cannot reach {url}: {exc}") from None
    if resp.status_code >= 400:
        raise GuardtuneError(f"{resp.status_code}: {error_message(resp, 200)}")
    json.dump(resp.json(), sys.stdout, indent=2)
    print()
    return 0
