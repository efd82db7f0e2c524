"""`guardtune demo --once`: the README's first command, end to end on real vLLM, FAISS and MiniLM.

The two adapters come from the session fixture (kestrel as `sales`, otter as the hot-swap target
`sales-v2`), so the demo takes its "reuse" path instead of training for minutes.
"""

from __future__ import annotations

import json
import shutil

from serving.launcher import free_port
from tests.conftest import run_cli

LABELS = ["normal answer with citations", "approved-script match", "blocked injection", "redacted PII",
          "adapter hot-swap mid-conversation", "stage fallback"]


def test_demo_once_shows_every_case(two_adapters, tmp_path):
    _, adapters = two_adapters
    work = tmp_path / "demo"
    shutil.copytree(adapters["kestrel"], work / "adapters" / "sales")
    shutil.copytree(adapters["otter"], work / "adapters" / "sales-v2")

    r = run_cli("-m", "guardtune.cli", "demo", "--once", "--workdir", str(work), "--port", str(free_port()),
                timeout=900)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    assert "sales: reusing" in out and "sales-v2: reusing" in out
    for label in LABELS:
        assert f"[{label}] " in out and f"{label}: ok" in out, label

    cases = json.loads((work / "runs" / "demo" / "cases.json").read_text())
    assert [c["label"] for c in cases] == ["normal answer with citations", "approved-script match",
                                          "blocked injection", "redacted PII",
                                          "adapter hot-swap mid-conversation", "stage fallback"]
    assert all(c["ok"] for c in cases)
    # The hot-swap really changed the adapter load behind `sales`, and the mapping was committed.
    state = json.loads((work / "state" / "demo-serve-state.json").read_text())
    assert state["sales"].endswith("sales-v2") and state["support"].endswith("sales")
    # What the demo built is on disk where it said: the script store, the index and the audit trail.
    assert (work / "stores" / "scripts" / "meta.json").is_file()
    assert any((work / "indexes" / "kestrel-kb").iterdir())
    assert (work / "audit" / "demo.db").is_file()
    # The keys were made for this run and never written to the config file the server read.
    assert "demo-user-" not in (work / "runs" / "demo" / "serve.yaml").read_text()


def test_demo_refuses_a_broken_reused_adapter(tmp_path):
    work = tmp_path / "demo"
    (work / "adapters" / "sales").mkdir(parents=True)
    (work / "adapters" / "sales" / "guardtune.json").write_text("{not json")
    r = run_cli("-m", "guardtune.cli", "demo", "--once", "--workdir", str(work), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "invalid manifest" in r.stderr
