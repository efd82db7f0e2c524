"""System turns read as the developer's instructions against read as user turns, in one run, through
the committed moderation (patterns, classifier, the default config):

- system prompts (bench/data/system_prompts.jsonl, never trained on): the share blocked each way, per
  language and per part (a: 420 written to a brief of confidentiality and restriction rules; b: 90
  written apart, to a brief of formats: tool lists, JSON schemas, RAG context, personas);
- what it gives up: the share of a sample of the held-out split's attacks blocked in a system turn
  each way (an attacker who writes the system turn already owns the app; templating untrusted text
  into it is what `system_turns: untrusted` is for).

Results: bench/results/system_turns.{json,md}.

    .venv/bin/python bench/system_turn_bench.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import results_io  # noqa: E402
from guardrails.classifier.augment import augment  # noqa: E402
from guardrails.classifier.data import load_seeds  # noqa: E402
from guardrails.moderation import ModerationConfig, Moderator  # noqa: E402

PROMPTS = ROOT / "bench" / "data" / "system_prompts.jsonl"
READS = ("user", "system")  # the role each text is moderated as


def blocked(mod: Moderator, texts: list[str], role: str) -> np.ndarray:
    return np.array([mod.check(t, role=role).blocked_by is not None for t in texts])


def run(attacks: int) -> dict:
    mod = Moderator(ModerationConfig(pii="off"))
    prompts = [json.loads(line) for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [p["text"] for p in prompts]
    groups = {"all": np.ones(len(prompts), bool)}
    groups |= {lg: np.array([p["lang"] == lg for p in prompts]) for lg in ("en", "zh", "de")}
    groups |= {f"part {k}": np.array([p["part"] == k for p in prompts]) for k in ("a", "b")}
    test = [r.text for r in augment(load_seeds()) if r.split == "test" and r.labels]
    sample = [test[i] for i in np.random.default_rng(0).permutation(len(test))[:attacks]]
    res = {"meta": results_io.meta(prompts=len(prompts), attacks=len(sample)), "prompts": {}, "attacks": {}}
    for role in READS:
        hit = blocked(mod, texts, role)
        res["prompts"][role] = {g: round(float(hit[sel].mean()), 4) for g, sel in groups.items()}
        res["attacks"][role] = round(float(blocked(mod, sample, role).mean()), 4)
    return res


def lines(res: dict) -> list[str]:
    m, p, a = res["meta"], res["prompts"], res["attacks"]
    out = [f"# System turns read as instructions against read as user turns ({m['date']}, {m['machine']})", "",
           f"Share of {m['prompts']} system prompts blocked (bench/data/system_prompts.jsonl):", ""]
    out += results_io.table(["read as", *p["user"]], [[role, *p[role].values()] for role in READS])
    out += ["", f"Share of {m['attacks']} held-out attacks blocked when sent as a system turn: "
            f"{a['user']} read as a user turn, {a['system']} read as instructions.", ""]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attacks", type=int, default=1000, help="held-out attacks to sample")
    a = p.parse_args()
    res = run(a.attacks)
    results_io.write(ROOT / "bench" / "results" / "system_turns", res, lines(res))


if __name__ == "__main__":
    main()
