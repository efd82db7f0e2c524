"""The screen a knowledge-base chunk passes before it may reach a prompt (`guardtune rag ingest`).

Retrieved text reaches the prompt after the input guardrails ran, so this is its only check. rag
takes any callable of this shape (`rag.index.Screen`); the front door hands it this one.
"""

from __future__ import annotations

from guardrails.classifier.categories import ATTACKS
from guardrails.scanners.classifier import ContentClassifier
from guardrails.scanners.injection import Injection
from guardrails.scanners.normalise import Normalise


class InjectionScreen:
    """A chunk as the input guardrails see a user turn: normalised, then checked for prompt injection
    and jailbreak by the patterns and the classifier. Other categories are left alone: a knowledge
    base may well discuss fraud or violence.
    """

    name = "prompt_injection+classifier"  # recorded in meta.json; another screen re-screens unchanged documents

    def __init__(self) -> None:
        self.normalise, self.injection, self.classifier = Normalise(), Injection(), ContentClassifier()

    def __call__(self, text: str) -> str | None:
        clean = self.normalise.scan(text).text
        if not (verdict := self.injection.scan(clean)).valid:
            return verdict.reason
        flags = [c for c in self.classifier.scan(clean).flags if c in ATTACKS]
        return f"classifier: {', '.join(flags)}" if flags else None
