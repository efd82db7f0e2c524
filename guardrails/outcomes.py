"""What became of a guarded chat request: the one vocabulary of audit records, metrics and the dashboard.

Serving labels every request with one of these (the `outcome` of its audit record and the `guardrail`
label of `guardtune_requests_total`); the audit CLI filters and exports by them.
"""

from __future__ import annotations

import re
from typing import Iterable

from kernel.errors import GuardtuneError

PASSED = "passed"  # no guardrail changed anything (or the request was not guarded)
BLOCKED = "blocked"  # an input scanner refused the request before the model ran
REDACTED = "redacted"  # PII was masked in the input; the reply was the model's
SCRIPT = "script"  # output compliance replaced the reply with an approved script
FALLBACK = "fallback"  # output compliance replaced the reply with the stage's fallback
MONITOR_SCRIPT = "monitor_script"  # monitor mode: would have been SCRIPT, the reply stood
MONITOR_FALLBACK = "monitor_fallback"  # monitor mode: would have been FALLBACK, the reply stood
LEAK = "leak"  # the output filter stopped a reply that leaked the system prompt or its canary
INVALID = "invalid"  # a JSON or tool-call reply was withheld: it failed its schema, the task's tools or the output scanners
MONITOR_INVALID = "monitor_invalid"  # monitor mode: would have been INVALID, the reply stood
OUTCOMES = (PASSED, BLOCKED, REDACTED, SCRIPT, FALLBACK, MONITOR_SCRIPT, MONITOR_FALLBACK, LEAK, INVALID,
            MONITOR_INVALID)

ERROR = "error_<status>"  # a failed request, by HTTP status: error_499 (client left), error_504, ...
_ERROR = re.compile(r"error_[1-5][0-9][0-9]")
# Every outcome, as one regular expression (an API's query schema states what it accepts).
PATTERN = f"^({'|'.join(OUTCOMES)}|{_ERROR.pattern})$"


def error(status: int) -> str:
    """The outcome of a request that ended with HTTP `status` instead of a reply."""
    return f"error_{status}"


def monitored(decision: str) -> str:
    """The outcome of a decision (SCRIPT, FALLBACK or INVALID) taken in monitor mode."""
    return f"monitor_{decision}"


def is_outcome(value: object) -> bool:
    return isinstance(value, str) and (value in OUTCOMES or _ERROR.fullmatch(value) is not None)


def described() -> str:
    """The valid outcomes in one line, for help texts and errors."""
    return f"{', '.join(OUTCOMES)} or {ERROR}"


def check(values: str | Iterable[str], flag: str = "outcome") -> list[str]:
    """`values` (one outcome or several) as a list; an unknown one is a one-line error naming the valid ones."""
    values = [values] if isinstance(values, str) else list(values)
    unknown = [v for v in values if not is_outcome(v)]
    if unknown:
        raise GuardtuneError(f"{flag}: unknown outcome {', '.join(map(repr, unknown))}; use {described()}")
    return values
