"""Prompt injection and jailbreak: cheap multilingual patterns first, then semantic similarity to exemplars.

Patterns cover English, Chinese and German phrasings of "ignore your instructions", "show your system
prompt" and role-play around the rules. The semantic check embeds the input with the packaged MiniLM
and compares it with an exemplar set; MiniLM is an English model, so the patterns carry the other
languages. The patterns run on RE2 over the whole text in linear time; the embedding reads bounded
windows of it (guardrails/embeddings.py), so neither costs more than the text's length allows.
"""

from __future__ import annotations

from pathlib import Path

from guardrails.scanners import linear
from guardrails.scanners.base import Verdict

_EXEMPLARS = Path(__file__).resolve().parents[1] / "data" / "injection_exemplars.txt"

SOURCES = (
    # English
    r"\b(ignore|disregard|forget|override|bypass)\b.{0,40}\b(previous|prior|above|earlier|all|your|the)\b.{0,20}"
    r"\b(instructions?|rules?|guidelines?|prompts?|polic(y|ies)|restrictions?)",
    r"\b(reveal|show|print|repeat|output|tell me|what (is|are))\b.{0,30}\b(system|hidden|initial|original|secret)\b"
    r".{0,15}\b(prompt|instructions?|message|setup|configuration)",
    r"\b(developer|god|dan|jailbreak|unfiltered|unrestricted)\s+mode\b",
    r"\b(pretend|act|roleplay|role-play)\b.{0,40}\b(no|without|free of|ignor\w*)\b.{0,20}"
    r"\b(rules|limits|restrictions|filters|guidelines)",
    r"\bnew (system )?(message|instructions?)\s*:",
    # Chinese
    r"(忽略|无视|忘记|忘掉|绕过).{0,12}(之前|以上|上面|先前|所有|你的)?.{0,6}(指令|指示|规则|设定|提示词|要求)",
    r"(系统提示词|系统提示|系统指令|初始指令|隐藏指令|内部指令|提示词).{0,10}(告诉|显示|输出|打印|发给|给我|是什么)",
    r"(告诉|显示|输出|打印|泄露).{0,10}(系统提示词|系统提示|系统指令|初始指令|隐藏指令|提示词)",
    r"(扮演|假装).{0,20}(没有|不受|无视).{0,6}(限制|规则|约束|过滤)",
    r"(开发者模式|越狱模式|无限制模式)",
    # German
    r"\b(ignoriere|vergiss|missachte|umgehe)\b.{0,40}\b(vorherigen|bisherigen|alle|deine|die)\b.{0,20}"
    r"\b(anweisungen|regeln|vorgaben|richtlinien|instruktionen)",
    r"\b(zeig|zeige|verrate|gib|nenne|wiederhole)\b.{0,30}\b(system-?prompt|systemanweisung\w*|versteckten anweisungen"
    r"|ursprünglichen anweisungen)",
    r"\b(tu so als|spiele|stell dir vor)\b.{0,40}\b(ohne|keine)\b.{0,15}\b(regeln|grenzen|einschränkungen|filter)",
    r"\bentwicklermodus\b",
)
PATTERNS = [linear.compile(p, ignore_case=True) for p in SOURCES]


class Injection:
    name = "prompt_injection"

    def __init__(self, threshold: float = 0.62, exemplars: list[str] | None = None):
        self.threshold = threshold
        self.exemplars = exemplars or [
            line.strip() for line in _EXEMPLARS.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]
        self._vectors = None

    def _similarity(self, text: str) -> float:
        from guardrails.embeddings import embed, embed_windows

        if self._vectors is None:
            self._vectors = embed(self.exemplars)
        return float((self._vectors @ embed_windows(text).T).max())  # best exemplar over the text's windows

    def scan(self, text: str) -> Verdict:
        data = linear.utf8(text)  # encoded once for all the patterns
        for p in PATTERNS:
            if m := p.search(data):
                return Verdict(self.name, text, False, 1.0,
                               f"matches an injection pattern: {linear.decode(m.group())[:60]!r}")
        sim = self._similarity(text)
        if sim >= self.threshold:
            return Verdict(self.name, text, False, sim, f"similar ({sim:.2f}) to a known injection")
        return Verdict(self.name, text, True, sim)
