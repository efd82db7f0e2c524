"""Input moderation: the configured scanners in order, fail-fast, sanitised text flowing through.

Also the OpenAI-moderation view of the same verdicts (flagged, categories, category_scores).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from guardrails.scanners.base import Scanner, Verdict


class ModerationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normalise: bool = True
    max_chars: int = Field(4000, ge=1)
    pii: Literal["redact", "block", "off"] = "redact"
    injection: bool = True
    injection_threshold: float = Field(0.62, gt=0, le=1)
    banned_topics: dict[str, list[str]] = Field(default_factory=dict)
    topic_threshold: float = Field(0.55, gt=0, le=1)
    refusals: dict[str, str] = Field(default_factory=dict, description="scanner name -> reply when it blocks")
    default_refusal: str = "Sorry, I can't help with that request."


@dataclass
class ModerationResult:
    text: str  # sanitised input
    verdicts: list[Verdict] = field(default_factory=list)
    latency_ms: float = 0.0

    @property
    def blocked_by(self) -> Verdict | None:
        return next((v for v in self.verdicts if not v.valid), None)

    def report(self) -> dict:
        return {"blocked_by": self.blocked_by.scanner if self.blocked_by else None,
                "verdicts": [{"scanner": v.scanner, "valid": v.valid, "score": round(v.score, 4), "reason": v.reason}
                             for v in self.verdicts],
                "latency_ms": round(self.latency_ms, 2)}


def build_scanners(cfg: ModerationConfig) -> list[Scanner]:
    from guardrails.scanners.injection import Injection
    from guardrails.scanners.limits import SizeCharset
    from guardrails.scanners.normalise import Normalise
    from guardrails.scanners.pii import PII
    from guardrails.scanners.topics import BannedTopics

    # Normalise knows the size limit, so NFKC never grows a text the size check will refuse anyway.
    scanners: list[Scanner] = [Normalise(max_chars=cfg.max_chars)] if cfg.normalise else []
    scanners.append(SizeCharset(max_chars=cfg.max_chars))
    if cfg.pii != "off":  # early, so no later step (or the audit of a block) ever sees the raw PII
        scanners.append(PII(action=cfg.pii))
    if cfg.injection:
        scanners.append(Injection(threshold=cfg.injection_threshold))
    if cfg.banned_topics:
        scanners.append(BannedTopics(cfg.banned_topics, threshold=cfg.topic_threshold))
    return scanners


class Moderator:
    def __init__(self, cfg: ModerationConfig | None = None):
        self.cfg = cfg or ModerationConfig()
        self.scanners = build_scanners(self.cfg)

    def check(self, text: str, *, fail_fast: bool = True) -> ModerationResult:
        t0 = time.perf_counter()
        result = ModerationResult(text)
        for scanner in self.scanners:
            v = scanner.scan(result.text)
            result.verdicts.append(v)
            result.text = v.text
            if not v.valid and fail_fast:
                break
        result.latency_ms = (time.perf_counter() - t0) * 1000
        return result

    def refusal(self, scanner: str) -> str:
        return self.cfg.refusals.get(scanner, self.cfg.default_refusal)

    def openai_result(self, text: str) -> dict:
        """One entry of an OpenAI /v1/moderations response: every scanner runs, none short-circuits."""
        res = self.check(text, fail_fast=False)
        categories = {s.name: False for s in self.scanners if s.name != "normalise"}
        scores = {name: 0.0 for name in categories}
        for v in res.verdicts:
            if v.scanner in categories:
                categories[v.scanner] = (not v.valid) or (v.scanner == "pii" and v.score > 0)
                scores[v.scanner] = round(float(v.score), 4)
        return {"flagged": any(categories.values()), "categories": categories, "category_scores": scores}
