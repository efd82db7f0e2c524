"""A knowledge index: document chunks embedded with MiniLM into FAISS, kept in one directory.

    meta.json     version, embedding model, dim, index type, chunking settings, counts, the ingest screen's
                  name and the chunks it quarantined [{source, doc_id, chunk, start, end, reason}]
    chunks.json   {"documents": {source: {doc_id, sha256, chunks, quarantined}},
                   "chunks": [{doc_id, source, chunk, start, end, text, sha256}]}   (sha256: the document's)
    vectors.npy   float32 [chunks, dim]; row i is chunk i and FAISS id i
    index.faiss   exact (IndexFlatIP in an IndexIDMap2) or HNSW (IndexHNSWFlat, inner product)

Vectors are unit length, so scores are cosine similarities. Ingest is incremental by document content
hash; the stored vectors let it rebuild the FAISS index without re-embedding unchanged documents (simpler
and safer than removing ids from HNSW). The directory is replaced atomically, so a reader sees the old
index or the new one. Retrieved text lands in prompts, so ingest can screen each chunk (for prompt
injection, say) and quarantine the flagged ones: they get no vector and are never retrieved.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from kernel import encoder
from kernel.errors import GuardtuneError
from kernel.fsutil import atomic_dir
from rag.chunking import check_sizes, chunk_text, find_documents, read_document, title

VERSION = 1
EMBEDDING = "all-MiniLM-L6-v2"
DIM = 384
INDEX_TYPES = ("auto", "exact", "hnsw")
HNSW_THRESHOLD = 50_000  # below this many vectors exact search is fast enough and has perfect recall
HNSW_M, HNSW_EF_SEARCH = 32, 64
EMBED_BATCH = 256  # chunks per embed call, so long ingests print progress

Screen = Callable[[str], str | None]  # chunk text -> why it is quarantined, None when clean; its `name`, if any, goes to meta.json


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
    quarantined: list[dict] = field(default_factory=list)  # {source, doc_id, chunk, start, end, reason}
    refused: list[str] = field(default_factory=list)  # "<path>: <why>" for symlinks leaving the root

    def summary(self) -> str:
        """One line of counts, then one line per quarantined chunk and per refused symlink."""
        head = (f"rag ingest: {self.added} added, {self.updated} updated, {self.removed} removed, "
                f"{self.unchanged} unchanged documents; embedded {self.chunks_embedded} chunks, "
                f"{self.chunks_total} in the {self.index_type} index; {len(self.quarantined)} chunks quarantined, "
                f"{len(self.refused)} symlinks refused; {self.seconds:.1f} s -> {self.index_dir}")
        return "\n".join([head, *(f"  quarantined {q['source']}#{q['chunk']} (doc {q['doc_id']}): {q['reason']}"
                                   for q in self.quarantined), *(f"  refused {r}" for r in self.refused)])


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

    @property
    def quarantined(self) -> list[dict]:
        """Chunks the ingest screen kept out of the index (older indexes have none recorded)."""
        return self.meta.get("quarantined", [])

    def search(self, query: str, top_k: int = 5, min_score: float = 0.0) -> list[Hit]:
        return self.search_many([query], top_k, min_score)[0]

    def search_many(self, queries: list[str], top_k: int = 5, min_score: float = 0.0) -> list[list[Hit]]:
        """Best chunks per query, highest cosine first; one embed call for all queries."""
        if not queries or not self.chunks or top_k < 1:
            return [[] for _ in queries]
        # A single query is usually a user turn the guardrails already embedded: take it from the cache.
        vectors = encoder.embed_one(queries[0]).reshape(1, -1) if len(queries) == 1 else encoder.embed(queries)
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
           overlap: int = 40, hnsw_threshold: int = HNSW_THRESHOLD, screen: Screen | None = None,
           log: Callable[[str], None] = print) -> IngestReport:
    """Bring the index at `index_dir` in line with the .md/.txt/.html files under `root_dir`.

    `screen(chunk text)` returns why a chunk must not reach a prompt (None when clean): such chunks are
    quarantined, kept out of the index and listed in the report and meta.json. Unchanged documents keep
    their earlier verdicts unless the screen changed (by name, or on/off): then their chunks are screened
    again, reusing the stored vectors. Symlinks leading out of `root_dir` are refused and reported.
    """
    t0 = time.time()
    root, index_dir = Path(root_dir), Path(index_dir)
    files, refused = _documents(root, index_type, chunk_tokens, overlap, log)
    old, old_vectors = _existing(index_dir) or (None, None)
    stored = _reusable(old, old_vectors, chunk_tokens, overlap, log)
    screen_name = _screen_name(screen)
    rescreen = old is not None and old.meta.get("screen") != screen_name
    if rescreen and stored:
        log(f"rag: screen changed ({old.meta.get('screen')} -> {screen_name}); screening every document again")
    log(f"rag: {len(files)} documents under {root}")

    build = _Build(chunk_tokens, overlap, screen, log)
    documents, counts = build.documents(files, old, stored, rescreen)
    removed = len(set(old.documents if old else {}) - set(files))
    kind = choose_index_type(index_type, len(build.rows), hnsw_threshold)
    if old and not (counts["added"] or counts["updated"] or removed or rescreen) and kind == old.meta["index_type"]:
        log("rag: nothing changed")
        return IngestReport(str(index_dir), 0, 0, 0, counts["unchanged"], 0, len(build.rows), kind,
                            time.time() - t0, build.quarantined, refused)

    vectors = build.vectors()
    log(f"rag: building the {kind} index over {len(build.rows)} vectors")
    meta = {"version": VERSION, "embedding": EMBEDDING, "dim": DIM, "index_type": kind,
            "chunk_tokens": chunk_tokens, "overlap": overlap, "documents": len(documents),
            "chunks": len(build.rows), "screen": screen_name, "quarantined": build.quarantined,
            "updated_at": time.time()}
    _write(index_dir, meta, documents, build.rows, vectors, build_faiss(vectors, kind))
    return IngestReport(str(index_dir), counts["added"], counts["updated"], removed, counts["unchanged"],
                        len(build.to_embed), len(build.rows), kind, time.time() - t0, build.quarantined, refused)


def _documents(root: Path, index_type: str, chunk_tokens: int, overlap: int,
               log: Callable[[str], None]) -> tuple[dict[str, Path], list[str]]:
    """The documents under `root` (source -> path) and the refused symlinks; bad arguments fail before any work."""
    if not root.is_dir():
        raise GuardtuneError(f"{root}: no such directory")
    choose_index_type(index_type, 0)
    check_sizes(chunk_tokens, overlap)
    refused: list[str] = []
    files = find_documents(root, refused)
    for line in refused:
        log(f"rag: refused {line}")
    if not files:
        raise GuardtuneError(f"{root}: no .md, .txt or .html files to ingest")
    return files, refused


def _reusable(old: KnowledgeIndex | None, old_vectors: np.ndarray | None, chunk_tokens: int, overlap: int,
              log: Callable[[str], None]) -> dict[str, list[tuple[dict, np.ndarray]]]:
    """source -> its stored (row, vector) pairs, for every stored document; empty when settings changed."""
    if old is None:
        return {}
    old_settings = {k: old.meta.get(k) for k in ("embedding", "chunk_tokens", "overlap")}
    if old_settings != {"embedding": EMBEDDING, "chunk_tokens": chunk_tokens, "overlap": overlap}:
        log(f"rag: chunking or embedding settings changed ({old_settings}); re-embedding every document")
        return {}
    stored: dict[str, list[tuple[dict, np.ndarray]]] = {source: [] for source in old.documents}
    for row, vec in zip(old.chunks, old_vectors):
        stored[row["source"]].append((row, vec))
    return stored


def _screen_name(screen: Screen | None) -> str | None:
    """What meta.json records of the screen; a different name next time means screening again."""
    if screen is None:
        return None
    return getattr(screen, "name", None) or getattr(screen, "__name__", None) or type(screen).__name__


class _Build:
    """The rows of the new index, in order, with their vectors (stored or still to embed) and the quarantine."""

    def __init__(self, chunk_tokens: int, overlap: int, screen: Screen | None, log: Callable[[str], None]):
        self.chunk_tokens, self.overlap, self.screen, self.log = chunk_tokens, overlap, screen, log
        self.rows: list[dict] = []
        self.row_vectors: list[np.ndarray | int] = []  # a stored vector, or the position of a text to embed
        self.to_embed: list[str] = []
        self.quarantined: list[dict] = []

    def documents(self, files: dict[str, Path], old: KnowledgeIndex | None,
                  stored: dict[str, list[tuple[dict, np.ndarray]]], rescreen: bool) -> tuple[dict, dict[str, int]]:
        """Every document's entry (source -> {doc_id, sha256, chunks, quarantined}) and the added/updated/
        unchanged counts. A document keeps its stored rows when its content hash matches (and its
        verdicts, unless `rescreen`), else it is chunked afresh."""
        old_docs: dict[str, dict] = old.documents if old else {}
        old_quarantine: dict[str, list[dict]] = {}
        for q in old.quarantined if old else []:
            old_quarantine.setdefault(q["source"], []).append(q)
        documents: dict[str, dict] = {}
        counts = {"added": 0, "updated": 0, "unchanged": 0}
        for source, path in files.items():
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            before = old_docs.get(source)
            same = bool(before and before["sha256"] == sha and source in stored)
            counts["unchanged" if same else "updated" if before else "added"] += 1
            if same and not rescreen:
                documents[source] = before
                self.keep(stored[source], old_quarantine.get(source, []))
            else:
                reuse = {row["chunk"]: vec for row, vec in stored.get(source, [])} if same else {}
                documents[source] = self.add(source, path, sha, reuse)
        return documents, counts

    def keep(self, pairs: list[tuple[dict, np.ndarray]], quarantined: list[dict]) -> None:
        """An unchanged document: its stored rows and vectors, its earlier quarantine."""
        self.rows += [row for row, _ in pairs]
        self.row_vectors += [vec for _, vec in pairs]
        self.quarantined += quarantined

    def add(self, source: str, path: Path, sha: str, reuse: dict[int, np.ndarray]) -> dict:
        """Chunk and screen a document; clean chunks become rows, with `reuse`d vectors by chunk number."""
        doc_id = hashlib.sha256(source.encode()).hexdigest()[:12]  # stable across content changes
        text = read_document(path)
        heading, indexed, flagged = title(text), 0, 0
        for c in chunk_text(text, self.chunk_tokens, self.overlap):
            reason = self.screen(c.text) if self.screen else None
            if reason:
                flagged += 1
                self._quarantine({"source": source, "doc_id": doc_id, "chunk": c.number, "start": c.start,
                                  "end": c.end, "reason": str(reason)})
                continue
            indexed += 1
            self.rows.append({"doc_id": doc_id, "source": source, "chunk": c.number, "start": c.start,
                              "end": c.end, "text": c.text, "sha256": sha})
            if c.number in reuse:
                self.row_vectors.append(reuse[c.number])
                continue
            self.row_vectors.append(len(self.to_embed))
            # Later chunks lose the document's subject; its title gives it back (stored text stays the chunk).
            self.to_embed.append(c.text if c.number == 0 else f"{heading}\n{c.text}")
        return {"doc_id": doc_id, "sha256": sha, "chunks": indexed, "quarantined": flagged}

    def _quarantine(self, record: dict) -> None:
        self.quarantined.append(record)
        self.log(f"rag: quarantined {record['source']}#{record['chunk']}: {record['reason']}")

    def vectors(self) -> np.ndarray:
        new = _embed_with_progress(self.to_embed, self.log)
        if not self.rows:
            return np.zeros((0, DIM), np.float32)
        return np.stack([new[v] if isinstance(v, int) else v for v in self.row_vectors])


def _embed_with_progress(texts: list[str], log: Callable[[str], None]) -> np.ndarray:
    if not texts:
        return np.zeros((0, DIM), np.float32)
    t0, parts = time.time(), []
    for i in range(0, len(texts), EMBED_BATCH):
        parts.append(encoder.embed(texts[i:i + EMBED_BATCH]))
        log(f"rag: embedded {min(i + EMBED_BATCH, len(texts))}/{len(texts)} chunks ({time.time() - t0:.1f} s)")
    return np.concatenate(parts)


def _write(index_dir: Path, meta: dict, documents: dict, rows: list[dict], vectors: np.ndarray, index) -> None:
    import faiss

    with atomic_dir(index_dir) as tmp:
        faiss.write_index(index, str(tmp / "index.faiss"))
        np.save(tmp / "vectors.npy", vectors)
        (tmp / "chunks.json").write_text(json.dumps({"documents": documents, "chunks": rows}, ensure_ascii=False))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
