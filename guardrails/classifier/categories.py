"""The categories the classifier scores: OpenAI's moderation names plus ours, and which imply which."""

from __future__ import annotations

# OpenAI's /v1/moderations categories, spelled as the official client's `Categories` aliases.
OPENAI = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
          "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
          "violence/graphic")
ATTACKS = ("prompt_injection", "jailbreak")
CATEGORIES = ATTACKS + OPENAI
UNSAFE = "unsafe"  # any category: the head's first output, the one that decides whether to flag
OUTPUTS = (UNSAFE, *CATEGORIES)  # the head's outputs, in order

# A sub-category's row is a row of its parent too (OpenAI's taxonomy).
PARENT = {"harassment/threatening": "harassment", "hate/threatening": "hate", "illicit/violent": "illicit",
          "self-harm/intent": "self-harm", "self-harm/instructions": "self-harm", "sexual/minors": "sexual",
          "violence/graphic": "violence"}

LANGS = ("en", "zh", "de")


def closed(labels) -> list[str]:
    """`labels` with every parent added, in head order; unknown names raise ValueError."""
    out = set(labels)
    unknown = out - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown categories: {sorted(unknown)}")
    out |= {PARENT[c] for c in out if c in PARENT}
    return [c for c in CATEGORIES if c in out]
