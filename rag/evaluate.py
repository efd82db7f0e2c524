"""Retrieval quality on a question set: recall@k (the answering document is among the top k) and MRR."""

from __future__ import annotations

import json
from pathlib import Path

from kernel.errors import GuardtuneError
from rag.index import KnowledgeIndex

CUTOFFS = (1, 3, 5, 10)


def load_questions(path: str | Path) -> list[dict]:
    """JSONL rows {"question": ..., "source": "<path of the answering document, relative to the ingested root>"}."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise GuardtuneError(f"{path}: cannot read questions ({exc.strerror})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            raise GuardtuneError(f"{path}:{n}: not valid JSON") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k] for k in ("question", "source")):
            raise GuardtuneError(f"{path}:{n}: needs non-empty string fields 'question' and 'source'")
        rows.append(row)
    if not rows:
        raise GuardtuneError(f"{path}: no questions")
    return rows


def recall_at_k(index: KnowledgeIndex, questions: list[dict], k: int = 10) -> dict:
    """{"questions", "k", "recall@N" for N in 1/3/5/10 up to k (and k), "mrr" (over the top k), "misses"}.

    A document's rank is that of its best chunk among the top-k chunks.
    """
    if k < 1 or not questions:
        raise GuardtuneError(f"recall needs k >= 1 (got {k}) and at least one question (got {len(questions)})")
    unknown = sorted({q["source"] for q in questions} - set(index.documents))
    if unknown:  # a typo here would silently read as a retrieval miss
        raise GuardtuneError(f"question sources not in the index: {', '.join(unknown[:5])}")
    results = index.search_many([q["question"] for q in questions], top_k=k, min_score=-1.0)
    ranks, misses = [], []
    for q, hits in zip(questions, results):
        sources = [h.source for h in hits]
        rank = sources.index(q["source"]) + 1 if q["source"] in sources else None
        ranks.append(rank)
        if rank is None:
            misses.append({"question": q["question"], "source": q["source"], "top": sources[0] if sources else None})
    report: dict = {"questions": len(questions), "k": k}
    for cut in sorted({c for c in CUTOFFS if c <= k} | {k}):
        report[f"recall@{cut}"] = sum(r is not None and r <= cut for r in ranks) / len(ranks)
    report["mrr"] = sum(1 / r for r in ranks if r) / len(ranks)
    report["misses"] = misses
    return report
