"""End to end: a real server with real traffic, /dashboard rendered by headless Chromium, and the
Grafana dashboard's PromQL checked against the metrics that server actually exposes.

Needs Debian's Chromium (`bash scripts/install_browser.sh`) and the `websockets` package (in .venv).
"""

from __future__ import annotations

import json
import os
import re

import httpx
import pytest

from serving.launcher import ServerProcess
from tests.conftest import ROOT
from tests.helpers.cdp import CHROMIUM

ARTIFACTS = ROOT / "tests" / "artifacts"
GRAFANA = ROOT / "deploy" / "grafana" / "guardtune-dashboard.json"
CHARTS = ["chart-latency-vs-length", "chart-buckets", "chart-ttft", "chart-throughput", "chart-errors",
          "chart-guardrails"]
N_REQUESTS = 30
PROMPT = "Count from one to one hundred, separating the numbers with commas."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`guardtune serve` on the transformers engine in a subprocess; yields its base URL."""
    tmp = tmp_path_factory.mktemp("dashboard-server")
    (tmp / "adapters").mkdir()
    # One torch thread: on a small shared box, OpenMP threads spinning against other work make decode
    # several times slower (and this test slow); a 135M model gains nothing from two.
    srv = ServerProcess({"engine": "transformers", "adapters_root": str(tmp / "adapters")}, tmp, ready_timeout=180,
                        env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    yield srv.url
    srv.stop()


def _send_traffic(url: str, n: int) -> list[dict]:
    """n sequential greedy chats, output lengths spread over 2..20 tokens (the engine serialises anyway)."""
    lengths = [2 + (i * 7) % 19 for i in range(n)]  # 2..20, interleaved so short and long alternate
    usage = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for max_tokens in lengths:
            resp = client.post("/v1/chat/completions", json={
                "model": "base", "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": max_tokens, "temperature": 0})
            assert resp.status_code == 200, resp.text
            usage.append(resp.json()["usage"])
    return usage


def _require_browser() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/install_browser.sh` (installs Debian's chromium)")
    try:
        import websockets  # noqa: F401
    except ImportError:
        pytest.fail("the `websockets` package is missing from this venv (vLLM brings it; or pip install websockets)")


def test_dashboard_renders_live_traffic(server, tmp_path):
    _require_browser()
    from tests.helpers.cdp import Browser

    usage = _send_traffic(server, N_REQUESTS)
    assert len({u["completion_tokens"] for u in usage}) >= 5, usage  # varied lengths, or there is no slope to fit

    with Browser(tmp_path / "chromium", width=1440, height=1800) as browser, browser.page() as page:
        page.send("Runtime.enable")
        page.send("Log.enable")
        page.navigate(f"{server}/dashboard")
        assert page.evaluate("typeof Plotly") == "object", "plotly.min.js did not load from /dashboard/plotly.min.js"
        page.wait_for(f"Number(document.body.dataset.records) >= {N_REQUESTS}", timeout=20)

        for chart in CHARTS:
            assert page.evaluate(f"!!document.getElementById('{chart}')?.querySelector('.main-svg')"), \
                f"#{chart} has no rendered Plotly graph"

        traces = page.evaluate("document.getElementById('chart-latency-vs-length').data"
                               ".map(t => ({name: t.name, mode: t.mode, n: (t.x || []).length}))")
        points = sum(t["n"] for t in traces if t["mode"] == "markers")
        assert points >= N_REQUESTS, traces

        # the fitted decode cost: in the per-task fit table and in the scatter's legend
        fits = page.evaluate("[...document.querySelectorAll('[data-ms-per-token]')]"
                             ".map(e => ({task: e.dataset.task, ms: Number(e.dataset.msPerToken)}))")
        assert [f["task"] for f in fits] == ["base"], fits
        assert fits[0]["ms"] > 0, fits
        text = page.evaluate("document.body.innerText")
        shown = [float(v) for v in re.findall(r"(\d+(?:\.\d+)?) ms/token", text)]
        assert shown and all(v > 0 for v in shown), text[:2000]
        legend = page.evaluate("document.getElementById('chart-latency-vs-length').textContent")
        assert re.search(r"base fit: \d+(\.\d+)? ms/token \+ -?\d+ ms", legend), legend

        header = page.evaluate("document.getElementById('stat-requests').textContent")
        assert int(header) >= N_REQUESTS
        assert page.evaluate("document.getElementById('last-updated').textContent") != "never"

        # a non-error console: the only acceptable noise is the browser's favicon probe
        errors = [e for e in page.errors() if "favicon.ico" not in e]
        assert not errors, errors

        shot = page.screenshot(ARTIFACTS / "dashboard.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000, shot.stat().st_size


# --- Grafana: every metric the dashboard queries must exist on a real server's /metrics

PROMQL_WORDS = {  # functions are excluded by the "(" that follows them; these are the bare keywords
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless",
    "inf", "nan", "le",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (enough PromQL for dashboards, not a full parser)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    s = re.sub(r"\{[^{}]*\}", "", s)                                      # label matchers
    s = re.sub(r"\[[^\[\]]*\]", "", s)                                    # range / subquery windows
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)  # label lists
    s = re.sub(r"\$\{?\w+\}?", " ", s)                                    # dashboard variables
    names = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", s):
        word = m.group(1)
        if word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


def _exprs(node) -> list[str]:
    """Every PromQL string in a dashboard: panel targets' expr and query variables' label_values()."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "expr" and isinstance(v, str):
                found.append(v)
            elif k in ("query", "definition") and isinstance(v, str) and "label_values(" in v:
                found.append(re.sub(r"label_values\(\s*([^,()]+?)\s*,\s*\w+\s*\)", r"\1", v))
            else:
                found += _exprs(v)
    elif isinstance(node, list):
        for v in node:
            found += _exprs(v)
    return found


def test_promql_metric_names_parser():
    expr = ('histogram_quantile(0.95, sum by (le, task, output_bucket) '
            '(rate(guardtune_latency_by_output_length_seconds_bucket{task=~"$task",status=~"[45].."}[5m])))'
            ' / on (task) group_left sum(rate(vllm:num_requests_running[1m])) > 1e-9')
    assert promql_metric_names(expr) == {"guardtune_latency_by_output_length_seconds_bucket",
                                         "vllm:num_requests_running"}


def test_grafana_dashboard_queries_exposed_metrics(server):
    dash = json.loads(GRAFANA.read_text())
    assert dash["schemaVersion"] >= 36 and dash["panels"]
    ds_vars = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert [v["name"] for v in ds_vars] == ["DS_PROMETHEUS"] and ds_vars[0]["query"] == "prometheus"
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], panel["title"]

    text = httpx.get(f"{server}/metrics", timeout=10).text
    exposed = set(re.findall(r"^# TYPE (\S+) ", text, re.M)) | set(re.findall(r"^([a-zA-Z_:][\w:]*)[{ ]", text, re.M))
    exprs = _exprs(dash)
    assert len(exprs) >= 20, exprs
    used: dict[str, str] = {}
    for expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"no metric in: {expr}"
        for name in names:
            used[name] = expr
    missing = {}
    for name, expr in used.items():
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        if name not in exposed and family not in exposed:
            missing[name] = expr
    assert not missing, f"metrics the server does not expose: {missing}"
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert {"guardtune_latency_by_output_length_seconds", "guardtune_time_to_first_token_seconds",
            "guardtune_time_per_output_token_seconds", "guardtune_output_tokens", "guardtune_requests_total",
            "guardtune_queue_depth", "guardtune_adapter_swaps_total"} <= families, families
