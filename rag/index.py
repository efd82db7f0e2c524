"""A knowledge index: document chunks embedded with MiniLM into FAISS, kept in one directory.

    meta.json     version, embedding model, dim, index type, chunking settings, counts
    chunks.json   {"documents": {source: {doc_id, sha256, chunks}},
                   "chunks": [{doc_id, source, chunk, start, end, text, sha256}]}   (sha256: the document's)
    vectors.npy   float32 [chunks, dim]; row i is chunk i and FAISS id i
    index.faiss   exact (IndexFlatIP in an IndexIDMap2) or HNSW (IndexHNSWFlat, inner product)

Vectors are unit length, so scores are cosine similarities. Ingest is incremental by document content
hash; the stored vectors let it rebuild the FAISS index without re-embedding unchanged documents (simpler
and safer than removing ids from HNSW). The directory is replaced atomically, so a reader sees the old
index or the new one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from guardtune.errors import GuardtuneError
from guardtune.fsutil import atomic_dir
from rag.chunking import check_sizes, chunk_text, find_documents, read_document, title

VERSION = 1
EMBEDDING = "all-MiniLM-L6-v2"
DIM = 384
INDEX_TYPES = ("auto", "exact", "hnsw")
HNSW_THRESHOLD = 50_000  # below this many vectors exact search is fast enough and has perfect recall
HNSW_M, HNSW_EF_SEARCH = 32, 64
EMBED_BATCH = 256  # chunks per embed call, so long ingests print progress


@dataclass(frozen=True)
class Hit:
    source: str
    doc_id: str
    chunk: int
    score: float
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class IngestReport:
    index_dir: str
    added: int
    updated: int
    removed: int
    unchanged: int
    chunks_embedded: int
    chunks_total: int
    index_type: str
    seconds: float

    def summary(self) -> str:
        return (f"rag ingest: {self.added} added, {self.updated} updated, {self.removed} removed, "
                f"{self.unchanged} unchanged documents; embedded {self.chunks_embedded} chunks, "
                f"{self.chunks_total} in the {self.index_type} index; {self.seconds:.1f} s -> {self.index_dir}")


def choose_index_type(requested: str, n_vectors: int, hnsw_threshold: int = HNSW_THRESHOLD) -> str:
    if requested not in INDEX_TYPES:
        raise GuardtuneError(f"index type '{requested}': choose one of {', '.join(INDEX_TYPES)}")
    if requested != "auto":
        return requested
    return "hnsw" if n_vectors >= hnsw_threshold else "exact"


def build_faiss(vectors: np.ndarray, index_type: str):
    """A FAISS index over `vectors` whose ids are their row numbers."""
    import faiss

    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(DIM, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = HNSW_EF_SEARCH  # saved with the index
        index.add(vectors)  # HNSW numbers vectors in insertion order
    else:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
        index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    return index


class KnowledgeIndex:
    """A loaded index, read-only: safe to search from several threads; reload to see a newer ingest."""

    def __init__(self, path: Path, meta: dict, documents: dict[str, dict], chunks: list[dict], index):
        self.path, self.meta, self.documents, self.chunks, self.index = path, meta, documents, chunks, index

    @classmethod
    def load(cls, path: str | Path) -> "KnowledgeIndex":
        import faiss

        path = Path(path)
        if not (path / "meta.json").is_file():
            raise GuardtuneError(f"knowledge index {path}: not found (no meta.json); "
                                 "build it with `guardtune rag ingest DIR --index ...`")
        try:
            meta = json.loads((path / "meta.json").read_text())
            store = json.loads((path / "chunks.json").read_text())
            index = faiss.read_index(str(path / "index.faiss"))
            documents, chunks, version = store["documents"], store["chunks"], meta["version"]
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise GuardtuneError(f"knowledge index {path}: corrupt ({type(exc).__name__}); "
                                 "delete it and ingest again") from None
        if version != VERSION or meta.get("dim") != DIM or index.ntotal != len(chunks):
            raise GuardtuneError(f"knowledge index {path}: metadata does not match the index "
                                 f"(version {version}, {index.ntotal} vectors, {len(chunks)} chunks); "
                                 "delete it and ingest again")
        return cls(path, meta, documents, chunks, index)

    def search(self, query: str, top_k: int = 5, min_score: float = 0.0) -> list[Hit]:
        return self.search_many([query], top_k, min_score)[0]

    def search_many(self, queries: list[str], top_k: int = 5, min_score: float = 0.0) -> list[list[Hit]]:
        """Best chunks per query, highest cosine first; one embed call for all queries."""
        from guardrails.embeddings import embed, embed_one

        if not queries or not self.chunks or top_k < 1:
            return [[] for _ in queries]
        # A single query is usually a user turn the guardrails already embedded: take it from the cache.
        vectors = embed_one(queries[0]).reshape(1, -1) if len(queries) == 1 else embed(queries)
        scores, ids = self.index.search(vectors, min(top_k, len(self.chunks)))
        return [[self._hit(int(i), float(s)) for s, i in zip(row_s, row_i) if i >= 0 and s >= min_score]
                for row_s, row_i in zip(scores, ids)]

    def _hit(self, i: int, score: float) -> Hit:
        c = self.chunks[i]
        return Hit(c["source"], c["doc_id"], c["chunk"], score, c["text"], c["start"], c["end"])


def _existing(index_dir: Path) -> tuple[KnowledgeIndex, np.ndarray] | None:
    """The index already at `index_dir` with its vectors; None for an absent or empty directory."""
    if not index_dir.exists() or (index_dir.is_dir() and not any(index_dir.iterdir())):
        return None
    if not (index_dir / "meta.json").is_file():
        raise GuardtuneError(f"{index_dir} exists and is not a knowledge index; refusing to replace it")
    old = KnowledgeIndex.load(index_dir)
    try:
        vectors = np.load(index_dir / "vectors.npy")
    except (OSError, ValueError) as exc:
        raise GuardtuneError(f"knowledge index {index_dir}: corrupt vectors.npy ({type(exc).__name__}); "
                             "delete it and ingest again") from None
    if vectors.shape != (len(old.chunks), DIM):
        raise GuardtuneError(f"knowledge index {index_dir}: vectors.npy does not match its chunks; "
                             "delete it and ingest again")
    return old, vectors


def ingest(root_dir: str | Path, index_dir: str | Path, *, index_type: str = "auto", chunk_tokens: int = 200,
           overlap: int = 40, hnsw_threshold: int = HNSW_THRESHOLD,
           log: Callable[[str], None] = print) -> IngestReport:
    """Bring the index at `index_dir` in line with the .md/.txt/.html files under `root_dir`."""
    t0 = time.time()
    root, index_dir = Path(root_dir), Path(index_dir)
    if not root.is_dir():
        raise GuardtuneError(f"{root}: no such directory")
    choose_index_type(index_type, 0)  # rejects a bad type before any work
    check_sizes(chunk_tokens, overlap)
    files = find_documents(root)
    if not files:
        raise GuardtuneError(f"{root}: no .md, .txt or .html files to ingest")

    old, old_vectors = _existing(index_dir) or (None, None)
    old_docs: dict[str, dict] = old.documents if old else {}
    stored: dict[str, list[tuple[dict, np.ndarray]]] = {}  # source -> its reusable (row, vector) pairs
    if old:
        old_settings = {k: old.meta.get(k) for k in ("embedding", "chunk_tokens", "overlap")}
        if old_settings == {"embedding": EMBEDDING, "chunk_tokens": chunk_tokens, "overlap": overlap}:
            for row, vec in zip(old.chunks, old_vectors):
                stored.setdefault(row["source"], []).append((row, vec))
            stored.update({s: [] for s, d in old_docs.items() if d["chunks"] == 0})
        else:
            log(f"rag: chunking or embedding settings changed ({old_settings}); re-embedding every document")
    log(f"rag: {len(files)} documents under {root}")

    # Per document: reuse its stored rows when the content hash matches, else chunk it afresh.
    documents: dict[str, dict] = {}
    rows: list[dict] = []
    row_vectors: list[np.ndarray | int] = []  # a stored vector, or the position of a chunk still to embed
    to_embed: list[str] = []
    counts = {"added": 0, "updated": 0, "unchanged": 0}
    for source, path in files.items():
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        before = old_docs.get(source)
        if before and before["sha256"] == sha and source in stored:
            counts["unchanged"] += 1
            documents[source] = before
            rows += [row for row, _ in stored[source]]
            row_vectors += [vec for _, vec in stored[source]]
            continue
        counts["updated" if before else "added"] += 1
        doc_id = hashlib.sha256(source.encode()).hexdigest()[:12]  # stable across content changes
        text = read_document(path)
        chunks, heading = chunk_text(text, chunk_tokens, overlap), title(text)
        for c in chunks:
            rows.append({"doc_id": doc_id, "source": source, "chunk": c.number, "start": c.start, "end": c.end,
                         "text": c.text, "sha256": sha})
            row_vectors.append(len(to_embed))
            # Later chunks lose the document's subject; its title gives it back (stored text stays the chunk).
            to_embed.append(c.text if c.number == 0 else f"{heading}\n{c.text}")
        documents[source] = {"doc_id": doc_id, "sha256": sha, "chunks": len(chunks)}
    removed = len(set(old_docs) - set(files))

    kind = choose_index_type(index_type, len(rows), hnsw_threshold)
    if old and not (counts["added"] or counts["updated"] or removed) and kind == old.meta["index_type"]:
        log("rag: nothing changed")
        return IngestReport(str(index_dir), 0, 0, 0, counts["unchanged"], 0, len(rows), kind, time.time() - t0)

    new_vectors = _embed_with_progress(to_embed, log)
    vectors = np.stack([new_vectors[v] if isinstance(v, int) else v for v in row_vectors]) if rows \
        else np.zeros((0, DIM), np.float32)
    log(f"rag: building the {kind} index over {len(rows)} vectors")
    meta = {"version": VERSION, "embedding": EMBEDDING, "dim": DIM, "index_type": kind,
            "chunk_tokens": chunk_tokens, "overlap": overlap, "documents": len(documents), "chunks": len(rows),
            "updated_at": time.time()}
    _write(index_dir, meta, documents, rows, vectors, build_faiss(vectors, kind))
    return IngestReport(str(index_dir), counts["added"], counts["updated"], removed, counts["unchanged"],
                        len(to_embed), len(rows), kind, time.time() - t0)


def _embed_with_progress(texts: list[str], log: Callable[[str], None]) -> np.ndarray:
    from guardrails.embeddings import embed

    if not texts:
        return np.zeros((0, DIM), np.float32)
    t0, parts = time.time(), []
    for i in range(0, len(texts), EMBED_BATCH):
        parts.append(embed(texts[i:i + EMBED_BATCH]))
        log(f"rag: embedded {min(i + EMBED_BATCH, len(texts))}/{len(texts)} chunks ({time.time() - t0:.1f} s)")
    return np.concatenate(parts)


def _write(index_dir: Path, meta: dict, documents: dict, rows: list[dict], vectors: np.ndarray, index) -> None:
    import faiss

    with atomic_dir(index_dir) as tmp:
        faiss.write_index(index, str(tmp / "index.faiss"))
        np.save(tmp / "vectors.npy", vectors)
        (tmp / "chunks.json").write_text(json.dumps({"documents": documents, "chunks": rows}, ensure_ascii=False))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
