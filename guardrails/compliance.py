"""Output compliance: the model's reply is replaced by the nearest approved script, or a stage fallback.

1. The raw generation is scanned (PII leaks, banned topics): a hit goes straight to the fallback.
2. It is embedded and matched against scripts of the current stage plus global ones.
3. At or above the threshold the script goes out verbatim; below it, the stage's fallback variant
   (sticky per session) does.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Literal

from guardrails.scanners.base import Scanner
from guardrails.scripts import ScriptStore
from kernel.encoder import embed_one


@dataclass
class Decision:
    outcome: Literal["script", "fallback"]
    sent: str
    score: float | None
    script_id: str | None
    fallback_stage: str | None
    fallback_variant: int | None
    stage: str | None
    reason: str
    latency_ms: float

    def report(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


class Compliance:
    def __init__(self, store: ScriptStore, *, output_scanners: list[Scanner] | None = None):
        self.store = store
        self.output_scanners = output_scanners or []

    def decide(self, raw: str, *, stage: str | None, session_id: str | None, threshold: float) -> Decision:
        t0 = time.perf_counter()
        store = self.store  # one snapshot: a reload mid-decision does not mix two stores
        reason = self.screen(raw)
        match = None
        if not reason and raw.strip():
            match = store.nearest(embed_one(raw), stage)
        if match is not None and match.score >= threshold:
            return Decision("script", match.script.text, match.score, match.script.id, None, None, stage,
                            f"nearest script {match.script.id} ({match.score:.2f} >= {threshold})", _ms(t0))
        text, variant, used = store.fallback(stage, session_id)
        if not reason:
            reason = (f"nearest script {match.script.id} scored {match.score:.2f} < {threshold}" if match
                      else "empty reply" if not raw.strip() else "no script for this stage")
        return Decision("fallback", text, match.score if match else None, match.script.id if match else None,
                        used, variant, stage, reason, _ms(t0))

    def screen(self, text: str) -> str:
        """Why the output scanners stop `text` ("" when none does): a PII hit or a banned topic."""
        for scanner in self.output_scanners:
            v = scanner.scan(text)
            if not v.valid or (scanner.name == "pii" and v.score > 0):
                return f"{scanner.name}: {v.reason}"
        return ""

    def infer_stage(self, user_text: str, previous: str | None, min_score: float = 0.35) -> str | None:
        """The stage of the staged script nearest to the user's words; else the session's last stage."""
        match = self.store.nearest(embed_one(user_text), None)
        if match is not None and match.script.stage != "*" and match.score >= min_score:
            return match.script.stage
        return previous


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000
