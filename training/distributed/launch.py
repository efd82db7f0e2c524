"""`train ... nproc=N | deepspeed=... | fsdp=true | hostfile=...`: plan, check and launch the ranks.

The ranks are started by torchrun (`python -m torch.distributed.run`), or on a cluster by the
deepspeed launcher; each re-runs `training.cli` with the same config and overrides. This module
only builds those commands, checks what can be checked before any process starts (the DeepSpeed
JSON against the batch settings, the hostfile, the world size), prepares the shared state once
(base model, tokenised data cache, resume point), and turns a failed rank into one error line.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kernel.errors import GuardtuneError
from kernel.models import resolve_base_model
from kernel.paths import cache_root
from training.base_model import load_tokenizer
from training.checkpoints import resume_point
from training.config import TrainConfig
from training.data.dataset import prepare
from training.distributed import runtime
from training.distributed.ds_config import check_deepspeed, deepspeed_path
from training.distributed.hostfile import Host, read_hostfile

_RANK0 = re.compile(r"^\[default0\]:")


@dataclass
class Plan:
    nnodes: int
    nproc: int
    master_addr: str
    hosts: list[Host]
    checks: list[str] = field(default_factory=list)
    node_commands: list[list[str]] = field(default_factory=list)  # torchrun, one per node
    deepspeed_command: list[str] | None = None  # the deepspeed launcher, run once from node 0

    @property
    def world(self) -> int:
        return self.nnodes * self.nproc


def launch_logs(cfg: TrainConfig) -> Path:
    return cfg.checkpoint_dir / "launch"


def wanted(cfg: TrainConfig) -> bool:
    """This process should launch ranks rather than train (it is not itself a rank)."""
    return (cfg.distributed or cfg.dry_run) and not runtime.launched()


def child_args(config: str | None, overrides: list[str]) -> list[str]:
    kept = [o for o in overrides if not o.startswith(("dry_run=", "node_rank="))]
    return ["-m", "training.cli", *([config] if config else []), *kept]


def plan(cfg: TrainConfig, config: str | None, overrides: list[str]) -> Plan:
    hosts = read_hostfile(cfg.hostfile) if cfg.hostfile else []
    p = Plan(*_topology(cfg, hosts), hosts)
    p.checks = _checks(cfg, p)
    child = child_args(config, overrides)
    p.node_commands = [_torchrun(cfg, p, node, child) for node in range(p.nnodes)]
    if hosts:
        p.deepspeed_command = ["deepspeed", "--hostfile", str(cfg.hostfile), "--master_addr", p.master_addr,
                               "--master_port", str(cfg.master_port), "--num_nodes", str(p.nnodes),
                               "--num_gpus", str(p.nproc), "--no_local_rank", "--module", *child[1:]]
    return p


def _topology(cfg: TrainConfig, hosts: list[Host]) -> tuple[int, int, str]:
    """(nodes, processes per node, master address): the config's, filled in and checked against the hostfile."""
    given = cfg.model_fields_set
    nnodes, nproc, addr = cfg.nnodes, cfg.nproc, cfg.master_addr
    if hosts:
        if "nnodes" in given and nnodes != len(hosts):
            raise GuardtuneError(f"nnodes {nnodes} but hostfile {cfg.hostfile} lists {len(hosts)} hosts")
        nnodes = len(hosts)
        slots = {h.slots for h in hosts}
        if "nproc" not in given:
            if len(slots) > 1:
                raise GuardtuneError(f"hostfile {cfg.hostfile} gives different slots per host ({sorted(slots)}); "
                                     "torchrun starts the same number on every node: set nproc")
            nproc = slots.pop()
        elif any(h.slots < nproc for h in hosts):
            short = next(h for h in hosts if h.slots < nproc)
            raise GuardtuneError(f"nproc {nproc} but hostfile gives {short.ip} only {short.slots} slots")
        if "master_addr" not in given:
            addr = hosts[0].ip
    if cfg.node_rank >= nnodes:
        raise GuardtuneError(f"node_rank {cfg.node_rank} must be below the node count {nnodes}")
    if nnodes > 1:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            raise GuardtuneError(f"master_addr '{addr}' is a hostname; give node 0's IP address") from None
        if ip.is_loopback:
            raise GuardtuneError(f"{nnodes} nodes need master_addr: node 0's IP address (or a hostfile), not {addr}")
    if cfg.launcher == "deepspeed" and nnodes > 1 and not hosts:
        raise GuardtuneError("launcher deepspeed needs a hostfile naming every node")
    return nnodes, nproc, addr


def _checks(cfg: TrainConfig, p: Plan) -> list[str]:
    """What was checked before any process starts, one line each for the dry run."""
    engine = (f"deepspeed {cfg.deepspeed}" if cfg.deepspeed else "fsdp" if cfg.fsdp else "ddp")
    checks = [f"world size {p.world} = {p.nnodes} node(s) x {p.nproc} process(es); {engine}; "
              "backend nccl on CUDA, gloo on CPU"]
    if p.hosts:
        checks.append(f"hostfile {cfg.hostfile}: {len(p.hosts)} hosts by IP: "
                      + ", ".join(f"{h.ip} slots={h.slots}" for h in p.hosts))
    if cfg.deepspeed:
        conf = check_deepspeed(cfg, p.world)
        checks.append(f"deepspeed {deepspeed_path(cfg.deepspeed)}: ZeRO stage {conf['zero_optimization']['stage']}; "
                      f"batch {cfg.batch_size} x grad_accum {cfg.grad_accum} x world {p.world} = "
                      f"{cfg.batch_size * cfg.grad_accum * p.world} sequences per step")
    return checks


def _torchrun(cfg: TrainConfig, p: Plan, node: int, child: list[str]) -> list[str]:
    """Node `node`'s torchrun command. Every rank's output goes to files under the run dir; rank 0's
    is also streamed (prefixed) for progress."""
    if p.nnodes == 1 and "master_port" not in cfg.model_fields_set:
        where = ["--standalone"]  # a free local port, so parallel runs on one machine do not collide
    elif p.nnodes == 1:
        where = ["--master-addr", p.master_addr, "--master-port", str(cfg.master_port)]
    else:
        where = ["--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                 f"{p.master_addr}:{cfg.master_port}", "--rdzv-id", cfg.task]
    return [sys.executable, "-m", "torch.distributed.run", "--tee", "3", "--local-ranks-filter", "0",
            "--log-dir", str(launch_logs(cfg)), "--nnodes", str(p.nnodes), "--nproc-per-node", str(p.nproc),
            *where, *child]


def print_plan(p: Plan, cfg: TrainConfig) -> None:
    print("dry run: nothing is trained")
    if not cfg.distributed:
        print("single process: `train` trains in its own process, without a launcher")
        return
    for line in p.checks:
        print(f"checked: {line}")
    for node, cmd in enumerate(p.node_commands):
        host = p.hosts[node].ip if p.hosts else ("this machine" if p.nnodes == 1 else f"node {node}")
        print(f"node {node} ({host}): {shlex.join(cmd)}")
    if p.deepspeed_command:
        print(f"or, once from node 0 (ssh to every host; exports .deepspeed_env): {shlex.join(p.deepspeed_command)}")
    if p.nnodes > 1:
        print("every node needs this checkout at the same path, and runs/ and adapters/ on shared storage "
              "for resume; see deploy/training/README.md")


def prepare_once(cfg: TrainConfig, log) -> Path | None:
    """Work that must not race between ranks: materialise the base, fill the data cache, pick the resume point."""
    base_dir = resolve_base_model(cfg.base_model, log=log)
    if cfg.stage == "sft" and cfg.train_file is not None:
        prepare(cfg, load_tokenizer(base_dir), log=lambda m: None)
    return resume_point(cfg, cfg.checkpoint_dir, log, writer=True)


def launch(cfg: TrainConfig, config: str | None, overrides: list[str], *, log) -> int:
    p = plan(cfg, config, overrides)
    if cfg.dry_run:
        print_plan(p, cfg)
        return 0
    if cfg.launcher == "deepspeed" and p.deepspeed_command:
        cmd = p.deepspeed_command
    else:
        cmd = p.node_commands[cfg.node_rank]
    import torch

    if cfg.fsdp and p.world < 2 and not torch.cuda.is_available():
        raise GuardtuneError(runtime.FSDP_CPU_NEEDS_2)
    resume = prepare_once(cfg, log) if cfg.node_rank == 0 else None
    logs = launch_logs(cfg)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cfg.node_rank == 0:  # other nodes' ranks read the (shared) run dir themselves
        env[runtime.RESUME_ENV] = str(resume or "")
    # DeepSpeed JIT-builds its CPU shared-memory collective once; keep the build in guardtune's cache.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(cache_root() / "torch_extensions"))
    log(f"launch: {p.world} processes on {p.nnodes} node(s): {shlex.join(cmd)}")
    return _run(cmd, env, logs, log)


def _run(cmd: list[str], env: dict, logs: Path, log) -> int:
    """Stream rank 0's output; keep the launcher's own chatter for the error line."""
    other: collections.deque[str] = collections.deque(maxlen=400)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    failing = False  # once rank 0 fails, its traceback stays in the log files: the summary line says it all
    try:
        for line in proc.stdout:
            if _RANK0.match(line):
                text = line.split(":", 1)[1]
                failing = failing or text.startswith(("Traceback (most recent call last)", "error: "))
                if not failing:
                    sys.stderr.write(text)
                    sys.stderr.flush()
            else:
                other.append(line.rstrip("\n"))
    finally:
        code = proc.wait()
    if code != 0:
        raise GuardtuneError(failure_line(code, list(other), logs))
    return code


def failure_line(code: int, launcher_lines: list[str], logs: Path) -> str:
    """One line naming the failed rank, its exit code and its last error message."""
    text = "\n".join(launcher_lines)
    rank = re.search(r"rank\s*:\s*(\d+) \(local_rank: (\d+)\)", text)
    exit_code = re.search(r"exitcode\s*:\s*(-?\d+)", text)
    who = f"rank {rank.group(1)}" if rank else "a rank"
    how = f"exited with code {exit_code.group(1)}" if exit_code else f"failed (launcher exit {code})"
    reason = ""
    if rank:
        errs = sorted(logs.glob(f"*/attempt_*/{rank.group(2)}/stderr.log"), key=lambda q: q.stat().st_mtime)
        if errs:
            raw = errs[-1].read_text(errors="replace").splitlines()
            lines = [ln for ln in (re.sub(r"^\[rank\d+\]:", "", x).strip() for x in raw) if ln]
            hits = [i for i, ln in enumerate(lines)
                    if ln.startswith("error: ") or re.match(r"^[\w.]+(Error|Exception)\b.*:", ln)]
            if hits or lines:
                # The exception line plus the two after it: pydantic and DeepSpeed put the detail there.
                first = hits[-1] if hits else len(lines) - 1
                text = " ".join(lines[first:first + 3]) if hits and not lines[first].startswith("error: ") \
                    else lines[first]
                reason = ": " + text.removeprefix("error: ")[:300]
    return f"distributed training failed: {who} {how}{reason} (every rank's log: {logs})"
