"""Schemathesis fuzzes a real `guardtune serve` over HTTP against the server's own /openapi.json.

Every operation gets its schema examples, boundary values (the coverage phase) and generated valid and
schema-breaking requests, sent with the right key so the handlers themselves are reached. All of
Schemathesis's checks must pass: no 5xx, and every answer's status, content type, headers and body are
ones the schema declares. Deterministic generation with a fixed seed, so a run is reproducible.
"""

from __future__ import annotations

import re

import httpx
import pytest

from tests.conftest import Server
from tests.helpers.fuzz import run_schemathesis

USER_KEY, ADMIN_KEY = "fuzz-user-key", "fuzz-admin-key"
MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    # The transformers engine starts in seconds; the fuzzing is aimed at the HTTP layer above it.
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "adapters").mkdir()
    srv = Server({"engine": "transformers", "adapters_root": str(tmp / "adapters"), "state_file": str(tmp / "state.json"),
                  "api_keys": [USER_KEY], "admin_key": ADMIN_KEY, "max_model_len": 256,
                  "limits": {"max_tokens_cap": 4, "max_body_bytes": 65536}}, tmp)
    srv.tmp = tmp
    yield srv
    srv.stop()


def test_schemathesis_finds_no_server_error_and_no_undeclared_answer(fuzz_server):
    proc, tested, cases = run_schemathesis(fuzz_server.url, fuzz_server.tmp, user=USER_KEY, admin=ADMIN_KEY,
                                           max_examples=MAX_EXAMPLES)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert tested >= 15, out[-3000:]  # every operation the app declares
    assert cases >= 200, out[-3000:]
    assert "Traceback" not in fuzz_server.log()


def test_the_fuzzing_reached_the_engine(fuzz_server):
    """The schema's example chat really generated: a 200 from the engine is in the metrics."""
    metrics = httpx.get(f"{fuzz_server.url}/metrics", headers={"Authorization": f"Bearer {USER_KEY}"}).text
    assert re.search(r'guardtune_requests_total\{[^}]*status="200"', metrics), metrics[-2000:]
