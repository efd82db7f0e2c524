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

from tests.conftest import Server, run_cli

USER_KEY, ADMIN_KEY = "fuzz-user-key", "fuzz-admin-key"
SEED, MAX_EXAMPLES = 20261124, 25

CONFIG = f"""
[generation]
deterministic = true
database = "none"

[[operations]]
include-path-regex = "^/admin"
headers = {{ Authorization = "Bearer {ADMIN_KEY}" }}

[[operations]]
include-path-regex = "^/v1"
headers = {{ Authorization = "Bearer {USER_KEY}" }}

# Rules no JSON schema can state, so schema-valid requests may still get a 400 here: the last turn must
# not be the assistant's, max_tokens must fit the server's cap and the context, an adapter path must be
# a trained adapter under the adapters root. Everywhere else a schema-valid request must not get a 400.
[[operations]]
include-path = "/v1/chat/completions"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]

[[operations]]
include-path = "/admin/tasks/{{task}}"
include-method = "PUT"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]
"""


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
    cfg = fuzz_server.tmp / "schemathesis.toml"
    cfg.write_text(CONFIG)
    proc = run_cli("-m", "schemathesis.cli", "--config-file", str(cfg), "run", f"{fuzz_server.url}/openapi.json",
                   "--checks", "all", "--seed", str(SEED), "--max-examples", str(MAX_EXAMPLES), "--workers", "1",
                   "--phases", "examples,coverage,fuzzing", "--request-timeout", "60", timeout=300,
                   cwd=fuzz_server.tmp)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    tested = re.search(r"Tested: (\d+)", out)
    cases = re.search(r"(\d+) generated", out)
    assert tested and int(tested.group(1)) >= 15, out[-3000:]  # every operation the app declares
    assert cases and int(cases.group(1)) >= 200, out[-3000:]
    assert "Traceback" not in fuzz_server.log()


def test_the_fuzzing_reached_the_engine(fuzz_server):
    """The schema's example chat really generated: a 200 from the engine is in the metrics."""
    metrics = httpx.get(f"{fuzz_server.url}/metrics").text
    assert re.search(r'guardtune_requests_total\{[^}]*status="200"', metrics), metrics[-2000:]
