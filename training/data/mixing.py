"""Dataset mixing: `datasets:` lists several sources with ratios, and the mix realises them on row counts.

The mix has `mix_size` rows (default: all train rows of the sources together). Source i gets
round(mix_size * ratio_i / sum(ratios)) rows (largest remainders, so the counts add up exactly):
- a source with more rows than its share is truncated to a seeded random subset;
- a source with fewer is repeated: whole passes over it, then a seeded random subset for the rest
  (sampling with replacement, without needless repeats).
The eval split is taken from each source's own unique rows before mixing, so a repeated train row
never also sits in eval. The realised mix (rows per source, share) is logged and stored in the manifest.
Replay sources arrive as files already generated (training/replay.py): data never loads a model.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from kernel.errors import GuardtuneError
from training.data.readers import read_jsonl
from training.data.split import eval_count


@dataclass
class Source:
    name: str
    path: Path
    ratio: float


@dataclass
class MixPlan:
    sources: list[Source]
    mix_size: int | None
    seed: int

    @classmethod
    def build(cls, cfg, replays: dict[int, Path]) -> "MixPlan":
        """Check every source; `replays` holds the generated file of each replay source, by its index."""
        sources = []
        for i, src in enumerate(cfg.datasets):
            if src.replay is not None:
                if i not in replays:
                    raise GuardtuneError(f"datasets[{i}]: replay source given no generated file")
                path, name = replays[i], f"replay:{Path(src.replay.prompts).name}"
            else:
                path, name = Path(src.path), Path(src.path).name
                if not path.is_file():
                    raise GuardtuneError(f"datasets[{i}] path {src.path}: no such file")
            sources.append(Source(name, path, src.ratio))
        return cls(sources, cfg.mix_size, cfg.seed)

    @property
    def files(self) -> list[Path]:
        return [s.path for s in self.sources]

    def key(self) -> str:
        """The mix settings that change rows (file contents are hashed by the caller)."""
        src = json.dumps([[s.name, s.ratio] for s in self.sources] + [self.mix_size, self.seed])
        return hashlib.sha256(src.encode()).hexdigest()[:16]

    def sample(self, *, eval_split: float, skip_bad_rows: bool, log=print):
        """(train conversations, eval conversations, bad rows, realised mix)."""
        rng = random.Random(self.seed)
        pools, evals, bad = [], [], []
        for s in self.sources:
            rows = read_jsonl(s.path, skip_bad_rows=skip_bad_rows)
            bad += rows.bad_rows
            convs = rows.conversations
            order = list(range(len(convs)))
            rng.shuffle(order)
            n_eval = eval_count(len(convs), eval_split)
            evals += [convs[i] for i in order[:n_eval]]
            pools.append([convs[i] for i in order[n_eval:]])
        total = self.mix_size or sum(len(p) for p in pools)
        targets = shares(total, [s.ratio for s in self.sources])
        train, mix = [], []
        for s, pool, want in zip(self.sources, pools, targets):
            if not pool and want:
                raise GuardtuneError(f"datasets source {s.name}: no train rows left after the eval split")
            train += draw(pool, want, rng)
            mix.append({"source": s.name, "ratio": s.ratio, "rows_available": len(pool), "rows": want,
                        "share": round(want / total, 4) if total else 0.0,
                        "passes": round(want / len(pool), 3) if pool else 0.0})
        rng.shuffle(train)
        log(describe(mix))
        return train, evals, bad, mix


def describe(mix: list[dict]) -> str:
    """The realised mix as one log line (also printed on a tokenised-cache hit)."""
    return "data mix: " + "; ".join(
        f"{m['source']} ratio {m['ratio']:g} -> {m['rows']} rows ({100 * m['share']:.1f}%, "
        f"{m['passes']:g}x of {m['rows_available']})" for m in mix)


def shares(total: int, ratios: list[float]) -> list[int]:
    """Integer row counts proportional to ratios that add up to total (largest remainders)."""
    weight = sum(ratios)
    exact = [total * r / weight for r in ratios]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(ratios)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(pool: list, n: int, rng: random.Random) -> list:
    """n rows from pool: a random subset when n <= len(pool), else whole passes plus a random subset."""
    if not pool:
        return []
    passes, rest = divmod(n, len(pool))
    return pool * passes + rng.sample(pool, rest)
