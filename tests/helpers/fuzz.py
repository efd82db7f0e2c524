"""Schemathesis against a running `guardtune serve`: every check, the right key per route, a fixed seed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SEED = 20261124

CONFIG = """
[generation]
deterministic = true
database = "none"

# A request may take as long as the client waits for it (--request-timeout): the check is for hangs,
# and on 2 busy cores one chat turn through the engine and both guards has taken 10.8 s.
[checks]
max_response_time = 60

[[operations]]
include-path-regex = "^/admin"
headers = {{ Authorization = "Bearer {admin}" }}

[[operations]]
include-path-regex = "^/v1"
headers = {{ Authorization = "Bearer {user}" }}

[[operations]]
include-path-regex = "^/(metrics|dashboard)"
headers = {{ Authorization = "Bearer {ops}" }}

# Rules no JSON schema can state, so schema-valid requests may still get a 400 here: the last turn must
# not be the assistant's, max_tokens must fit the server's cap and the context, n > 1 needs a temperature
# above 0, logit_bias ids must be in the vocabulary, the request must fit
# the server's size caps, an adapter path must be a trained adapter under the adapters root. Everywhere
# else a schema-valid request must not get a 400.
[[operations]]
include-path = "/v1/chat/completions"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]

# Text completions: the same budget rules, and echo cannot come with logprobs (no prompt logprobs).
[[operations]]
include-path = "/v1/completions"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]

[[operations]]
include-path = "/v1/moderations"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "429"]

# An embeddings input must also fit max_input_chars and the model (token ids in its vocabulary, no more
# than it reads), and `dimensions` needs a Matryoshka model; `model` must name an embedding model.
[[operations]]
include-path = "/v1/embeddings"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "404", "429"]

[[operations]]
include-path = "/admin/tasks/{{task}}"
include-method = "PUT"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]
"""


def run_schemathesis(url: str, workdir: Path, *, user: str, admin: str, ops: str | None = None,
                     max_examples: int = 25, timeout: int = 300,
                     workers: int = 2) -> tuple[subprocess.CompletedProcess, int, int]:
    """(process, operations tested, cases generated) of one Schemathesis run over the server's own schema.
    Two workers: the client's case generation and the server's handling overlap on two cores."""
    cfg = workdir / "schemathesis.toml"
    cfg.write_text(CONFIG.format(admin=admin, user=user, ops=ops or user))
    proc = subprocess.run([sys.executable, "-m", "schemathesis.cli", "--config-file", str(cfg), "run",
                           f"{url}/openapi.json", "--checks", "all", "--seed", str(SEED), "--max-examples",
                           str(max_examples), "--workers", str(workers), "--phases", "examples,coverage,fuzzing",
                           "--request-timeout", "60"], cwd=workdir, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    tested, cases = re.search(r"Tested: (\d+)", out), re.search(r"(\d+) generated", out)
    return proc, int(tested.group(1)) if tested else 0, int(cases.group(1)) if cases else 0
