"""Start `guardtune serve` (or another HTTP server) as a child process and wait until it is ready."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChildServer:
    """An HTTP server as a child process in its own session: its output goes to `log_path`; it is ready
    when `ready_path` answers 200; stopping sends SIGTERM (a graceful drain), then SIGKILL to the whole
    process group if it hangs. `bench/raw_vllm.py` starts vLLM's own server with it."""

    ready_path = "/ready"

    def __init__(self, cmd: list[str], log_path: Path, port: int, *, ready_timeout: float, env: dict[str, str],
                 cwd: Path = ROOT):
        self.port, self.url, self.log_path = port, f"http://127.0.0.1:{port}", log_path
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **env}, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready(ready_timeout)
        except BaseException:  # not ready, or interrupted while waiting: leave no server behind
            self.stop()
            raise

    def _wait_ready(self, ready_timeout: float) -> None:
        deadline = time.time() + ready_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}{self.ready_path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready in {ready_timeout} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class ServerProcess(ChildServer):
    """`guardtune serve` with `config` (written to `workdir`/serve.yaml), logging to `workdir`/serve.log."""

    def __init__(self, config: dict, workdir: Path, *, ready_timeout: float = 300, port: int | None = None,
                 env: dict[str, str] | None = None):
        port = port or free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = workdir / "serve.yaml"
        cfg_path.write_text(yaml.safe_dump({**config, "port": port}))
        super().__init__([sys.executable, "-m", "serving", "--config", str(cfg_path)],
                         workdir / "serve.log", port, ready_timeout=ready_timeout,
                         env={"HF_HUB_OFFLINE": "1", **(env or {})})
