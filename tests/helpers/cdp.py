"""A small Chrome DevTools Protocol client for driving Debian's headless Chromium from tests.

`Browser` starts Chromium with remote debugging on a free port (read back from the DevToolsActivePort
file in its own user-data dir) and always kills its whole process group on close; `Page` speaks CDP
over the page target's websocket (the `websockets` package, synchronous client).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


class CDPError(RuntimeError):
    pass


class Browser:
    """Headless Chromium with remote debugging; use as a context manager."""

    def __init__(self, user_data_dir: Path, *, width: int = 1440, height: int = 900, binary: str = CHROMIUM,
                 start_timeout: float = 30.0):
        self.user_data_dir = Path(user_data_dir)
        self.user_data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.user_data_dir.parent / f"{self.user_data_dir.name}.log"
        self.args = [binary, *FLAGS, f"--user-data-dir={self.user_data_dir}", "--remote-debugging-port=0",
                     f"--window-size={width},{height}", "about:blank"]
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def __enter__(self) -> "Browser":
        active = self.user_data_dir / "DevToolsActivePort"
        active.unlink(missing_ok=True)
        log = open(self.log_path, "wb")
        # Own session, so close() can kill the wrapper script and every Chromium child together.
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.start_timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise CDPError(f"chromium exited with {self.proc.returncode}: {self.log_tail()}")
                lines = active.read_text().splitlines() if active.exists() else []
                if lines and lines[0].strip().isdigit():
                    self.port = int(lines[0])
                    return self
                time.sleep(0.1)
            raise CDPError(f"chromium wrote no DevToolsActivePort in {self.start_timeout:.0f} s: {self.log_tail()}")
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if self.port is not None and proc.poll() is None:
            try:  # let Chromium shut its own children down (no zombies left to init), then make sure
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/version", timeout=2) as resp:
                    browser_ws = json.load(resp)["webSocketDebuggerUrl"]
                Page(browser_ws).send("Browser.close", timeout=5)
            except Exception:  # noqa: BLE001 - best effort; the signals below do the job anyway
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:  # whatever is left in the group (renderers, zygote, or a wrapper that ignored SIGTERM)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)

    def page(self) -> "Page":
        """Connect to the first page target (the about:blank tab Chromium opened)."""
        url = f"http://127.0.0.1:{self.port}/json/list"
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(url, timeout=5) as resp:
                targets = [t for t in json.load(resp) if t.get("type") == "page"]
            if targets or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if not targets:
            raise CDPError("chromium has no page target")
        return Page(targets[0]["webSocketDebuggerUrl"])


class Page:
    """CDP session on one page: send commands, keep the events that arrive meanwhile."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=64 * 2**20, open_timeout=10)
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def close(self) -> None:
        self.ws.close()

    def __enter__(self) -> "Page":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CDPError(f"{method}: no reply in {timeout:.0f} s")
            msg = json.loads(self.ws.recv(timeout=left))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise CDPError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def evaluate(self, expression: str, timeout: float = 30.0):
        """Value of a JS expression (awaited if it is a promise), as JSON-able Python."""
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                        timeout=timeout)
        if "exceptionDetails" in res:
            det = res["exceptionDetails"]
            raise CDPError(f"JS exception: {det.get('exception', {}).get('description') or det.get('text')}")
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, interval: float = 0.25):
        """Poll a JS expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise CDPError(f"timed out after {timeout:.0f} s waiting for: {expression} (last value {value!r})")
            time.sleep(interval)

    def navigate(self, url: str, timeout: float = 30.0) -> None:
        self.send("Page.enable")
        res = self.send("Page.navigate", {"url": url}, timeout=timeout)
        if res.get("errorText"):
            raise CDPError(f"navigate {url}: {res['errorText']}")
        self.wait_for("document.readyState === 'complete'", timeout=timeout)

    def screenshot(self, path: Path, *, full_page: bool = True) -> Path:
        params: dict = {"format": "png"}
        if full_page:
            size = self.evaluate("({w: document.documentElement.scrollWidth, h: document.documentElement.scrollHeight})")
            params |= {"captureBeyondViewport": True,
                       "clip": {"x": 0, "y": 0, "width": size["w"], "height": size["h"], "scale": 1}}
        data = base64.b64decode(self.send("Page.captureScreenshot", params, timeout=60)["data"])
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def errors(self) -> list[str]:
        """Uncaught exceptions and console/log errors seen so far (Runtime and Log must be enabled)."""
        out = []
        for ev in self.events:
            m, p = ev["method"], ev.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
            elif m == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"{p['entry'].get('source')}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out
