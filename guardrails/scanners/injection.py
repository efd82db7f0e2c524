"""Prompt injection by pattern: English, Chinese and German phrasings of "ignore your instructions",
"show your system prompt" and role-play around the rules. The trained classifier
(guardrails/scanners/classifier.py) does the detection; a pattern stays only where it adds recall at
no false-positive cost on the benign seed rows (tests/test_classifier.py checks that). The patterns run
on RE2 over the whole text, in linear time.
"""

from __future__ import annotations

from guardrails import linear
from guardrails.scanners.base import Verdict

SOURCES = (
    # English
    r"\b(ignore|disregard|forget|override|bypass)\b.{0,40}\b(previous|prior|above|earlier|all|your|the)\b.{0,20}"
    r"\b(instructions?|rules?|guidelines?|polic(y|ies)|restrictions?)",
    # "your"/"the": a question about system prompts in general ("what is a system prompt?") is not one
    r"\b(reveal|show|print|repeat|output|tell me|what (is|are))\b.{0,30}\b(your|the)\s+(system|hidden|initial|original"
    r"|secret)\b.{0,15}\b(prompt|instructions?|message|setup|configuration)",
    r"\b(dan|jailbreak|unfiltered|unrestricted)\s+mode\b",  # not "god mode": a cheat in games
    r"\b(pretend|act|roleplay|role-play)\b.{0,40}\b(no|without|free of|ignor\w*)\b.{0,20}"
    r"\b(rules|limits|restrictions|filters|guidelines)",
    # Chinese
    r"(忽略|无视|忘记|忘掉|绕过).{0,12}(之前|以上|上面|先前|所有|你的)?.{0,6}(指令|指示|规则|设定|提示词|要求)",
    r"(系统提示词|系统提示|系统指令|初始指令|隐藏指令|内部指令|提示词).{0,10}(告诉|显示|输出|打印|发给|给我)",
    # not 泄露 ("leak"): "how do companies stop bots leaking the system prompt?" is an honest question
    r"(告诉|显示|输出|打印).{0,10}(系统提示词|系统提示|系统指令|初始指令|隐藏指令|提示词)",
    r"(扮演|假装).{0,20}(没有|不受|无视).{0,6}(限制|规则|约束|过滤)",
    r"(越狱模式|无限制模式)",
    # German
    r"\b(ignoriere|vergiss|missachte|umgehe)\b.{0,40}\b(vorherigen|bisherigen|alle|deine|die)\b.{0,20}"
    r"\b(anweisungen|regeln|vorgaben|richtlinien|instruktionen)",
    r"\b(zeig|zeige|verrate|gib|nenne|wiederhole)\b.{0,30}\b(system-?prompt|systemanweisung\w*|versteckten anweisungen"
    r"|ursprünglichen anweisungen)",
)
PATTERNS = [linear.compile(p, ignore_case=True) for p in SOURCES]


class Injection:
    name = "prompt_injection"

    def scan(self, text: str) -> Verdict:
        data = linear.utf8(text)  # encoded once for all the patterns
        for p in PATTERNS:
            if m := p.search(data):
                return Verdict(self.name, text, False, 1.0,
                               f"matches an injection pattern: {linear.decode(m.group())[:60]!r}")
        return Verdict(self.name, text, True, 0.0)
