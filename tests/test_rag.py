"""RAG on the real packaged MiniLM and real FAISS, in temporary directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import guardrails.embeddings
from guardtune.errors import GuardtuneError
from rag.chunking import _tokenizer, chunk_text, html_to_text, read_document
from rag.cli import main as rag_main
from rag.evaluate import load_questions, recall_at_k
from rag.index import KnowledgeIndex, build_faiss, choose_index_type, ingest
from rag.prompting import citations, with_context
from tests.conftest import ROOT, run_cli

KB = ROOT / "examples" / "kb"
KB_QUESTIONS = ROOT / "examples" / "kb_questions.jsonl"
DOCS = {
    "bees.md": "# Honey bees\n\nA worker honey bee visits flowers to collect nectar and pollen. The hive stores "
               "nectar as honey for the winter, and the queen lays up to two thousand eggs a day.",
    "volcano.txt": "Volcanoes erupt when magma rises through cracks in the crust. Lava flows, ash clouds and "
                   "volcanic gases follow, and a caldera can form when the magma chamber empties.",
    "chess.html": "<html><head><style>p{color:red}</style></head><body><h1>Chess openings</h1><p>The Sicilian "
                  "Defence answers the king's pawn with the c-pawn, and the Queen's Gambit offers a pawn for the "
                  "centre.</p><script>alert('x')</script></body></html>",
    "bread.md": "Sourdough bread rises with a starter of wild yeast and lactic acid bacteria instead of baker's "
                "yeast. A long cold proof gives the crumb its open holes and sour taste.",
}


def quiet(_: str) -> None:
    pass


def write_docs(root: Path, docs: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def kb(tmp_path_factory) -> KnowledgeIndex:
    path = tmp_path_factory.mktemp("rag") / "kb"
    report = ingest(KB, path, log=quiet)
    print(f"\nexample KB: {report.summary()}")
    return KnowledgeIndex.load(path)


@pytest.fixture
def embedded(monkeypatch) -> list[str]:
    """Every text passed to the embedder, to prove what was (not) re-embedded."""
    seen: list[str] = []
    real = guardrails.embeddings.embed

    def counting(texts, *args, **kwargs):
        seen.extend(texts)
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(guardrails.embeddings, "embed", counting)
    return seen


def test_chunk_offsets_map_back_to_the_document_and_respect_the_size():
    tokens = _tokenizer()
    for path in sorted(KB.iterdir()):
        text = read_document(path)
        chunks = chunk_text(text, chunk_tokens=60, overlap=15)
        assert len(chunks) > 1 and [c.number for c in chunks] == list(range(len(chunks)))
        covered = np.zeros(len(text), bool)
        for prev, c in zip([None, *chunks], chunks):
            assert text[c.start:c.end] == c.text
            assert len(tokens(c.text, add_special_tokens=False)["input_ids"]) <= 60
            assert prev is None or prev.start < c.start < prev.end  # moves forward, overlapping its predecessor
            covered[c.start:c.end] = True
        assert all(covered[i] for i, ch in enumerate(text) if not ch.isspace()), path.name
    assert chunk_text("   \n") == []
    with pytest.raises(GuardtuneError, match="chunk size 300"):
        chunk_text("x", chunk_tokens=300)
    with pytest.raises(GuardtuneError, match="overlap 50"):
        chunk_text("x", chunk_tokens=50, overlap=50)


def test_html_keeps_the_text_and_drops_tags_scripts_and_styles():
    text = html_to_text("<html><head><title>T</title><style>p { color: red }</style><script>var a = '<p>x</p>';"
                        "</script></head><body><h1>Fish &amp; chips</h1><p>Hot\n   and <b>salty</b>.</p>"
                        "<table><tr><th>Size</th><td>large</td></tr></table></body></html>")
    assert text == "T\n\nFish & chips\n\nHot and salty.\n\nSize large"
    page = read_document(KB / "roof-440-black.html")
    assert "Rated power 440 W" in page and "22.4%" in page
    assert not any(s in page for s in ("<", "dataLayer", "font-family", "&nbsp;"))


def test_search_returns_the_answering_document_with_its_span(kb):
    for question, source, within in [("Which cities do you install in?", "service-area.html", 1),
                                     ("Are you open on Saturdays?", "contact-support.md", 1),
                                     ("Can I cancel my contract right after signing?", "cancellation-returns.md", 1),
                                     # colloquial: "power cut" is not the docs' "outage"; ranks 2nd (Charge 1st)
                                     ("Will a battery keep my lights on in a power cut?", "vault-10.md", 3)]:
        hits = kb.search(question, top_k=3)
        assert source in [h.source for h in hits[:within]], (question, [h.source for h in hits])
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    for row in kb.chunks:
        assert read_document(KB / row["source"])[row["start"]:row["end"]] == row["text"]
    assert kb.search("Are you open on Saturdays?", min_score=0.99) == []
    assert kb.meta["index_type"] == "exact" and kb.meta["documents"] == 14


def test_prompt_gets_numbered_sources_and_citations(kb):
    hits = kb.search("How much is the wallbox?", top_k=2)
    msgs = [{"role": "system", "content": "You are Kira."}, {"role": "user", "content": "How much is the wallbox?"}]
    out = with_context(msgs, hits)
    assert out[0]["content"].startswith("You are Kira.\n\nUse these sources") and out[1:] == msgs[1:]
    assert f"[1] ({hits[0].source})\n{hits[0].text.strip()}" in out[0]["content"] and "[2] (" in out[0]["content"]
    added = with_context(msgs[1:], hits, system_prompt="You are Kira.")
    assert added[0]["role"] == "system" and added[0]["content"] == out[0]["content"]
    assert with_context(msgs, []) == msgs
    assert citations(hits) == [{"index": n, "source": h.source, "chunk": h.chunk, "score": round(h.score, 4)}
                               for n, h in enumerate(hits, 1)]


def test_reingest_embeds_only_changed_documents(tmp_path, embedded):
    root, index_dir = write_docs(tmp_path / "docs", DOCS), tmp_path / "index"
    first = ingest(root, index_dir, log=quiet)
    assert (first.added, first.updated, first.removed, first.unchanged) == (4, 0, 0, 0)
    assert first.chunks_embedded == first.chunks_total == len(embedded) == 4
    doc_ids = KnowledgeIndex.load(index_dir).documents

    (root / "bees.md").write_text("# Honey bees\n\nBees dance a waggle dance to tell the hive where flowers are.")
    (root / "volcano.txt").unlink()
    (root / "comets.md").write_text("Comets are icy bodies whose tails of gas and dust point away from the Sun.")
    embedded.clear()
    second = ingest(root, index_dir, log=quiet)
    assert (second.added, second.updated, second.removed, second.unchanged) == (1, 1, 1, 2)
    assert sorted(embedded) == sorted([(root / "bees.md").read_text(), (root / "comets.md").read_text()])
    assert second.chunks_embedded == 2 and second.chunks_total == 4

    index = KnowledgeIndex.load(index_dir)
    assert set(index.documents) == {"bees.md", "bread.md", "chess.html", "comets.md"}
    assert index.documents["bees.md"]["doc_id"] == doc_ids["bees.md"]["doc_id"]  # ids survive edits
    assert index.search("How do bees tell each other where flowers are?", top_k=1)[0].text.startswith("# Honey bees")
    assert index.search("What makes comet tails?", top_k=1)[0].source == "comets.md"
    assert "volcano.txt" not in {h.source for h in index.search("Why do volcanoes erupt lava?", top_k=10)}

    embedded.clear()
    third = ingest(root, index_dir, log=quiet)
    assert (third.added, third.updated, third.removed, third.unchanged, third.chunks_embedded) == (0, 0, 0, 4, 0)
    assert embedded == []


def test_index_type_follows_corpus_size(tmp_path, embedded):
    assert choose_index_type("auto", 49_999) == "exact" and choose_index_type("auto", 50_000) == "hnsw"
    assert choose_index_type("exact", 10**6) == "exact" and choose_index_type("hnsw", 1) == "hnsw"
    with pytest.raises(GuardtuneError, match="index type 'ivf'"):
        choose_index_type("ivf", 1)

    root, index_dir = write_docs(tmp_path / "docs", DOCS), tmp_path / "index"
    assert ingest(root, index_dir, hnsw_threshold=3, log=quiet).index_type == "hnsw"
    index = KnowledgeIndex.load(index_dir)
    assert type(index.index).__name__ == "IndexHNSWFlat" and index.index.hnsw.efSearch == 64
    assert index.search("sourdough starter and proofing", top_k=1)[0].source == "bread.md"

    embedded.clear()
    switched = ingest(root, index_dir, index_type="exact", log=quiet)  # rebuilt from stored vectors
    assert switched.index_type == "exact" and switched.chunks_embedded == 0 and embedded == []
    assert KnowledgeIndex.load(index_dir).search("sourdough starter and proofing", top_k=1)[0].source == "bread.md"


def test_hnsw_recall_at_10_matches_exact_search():
    """5k random unit vectors around 100 random centres, spread so top-10 cosines are about 0.34-0.39.

    Like sentence embeddings they have structure. Isotropic Gaussian vectors in 384-d have none (every
    neighbour nearly equidistant), the worst case for a graph index: there efSearch=64 gives about 0.77.
    """
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((100, 384))

    def sample(n: int) -> np.ndarray:
        x = centres[rng.integers(0, 100, n)] + 1.5 * rng.standard_normal((n, 384))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    vectors, queries = sample(5000), sample(200)
    _, exact = build_faiss(vectors, "exact").search(queries, 10)
    _, approx = build_faiss(vectors, "hnsw").search(queries, 10)
    recall = np.mean([len(set(e) & set(a)) / 10 for e, a in zip(exact, approx)])
    print(f"\nHNSW recall@10 vs exact: {recall:.3f}")
    assert recall >= 0.9


def test_missing_or_corrupt_index_is_a_one_line_error(tmp_path, kb):
    def fails(path: Path, match: str) -> None:
        with pytest.raises(GuardtuneError, match=match) as exc:
            KnowledgeIndex.load(path)
        assert "\n" not in str(exc.value)

    fails(tmp_path / "nowhere", "not found")
    for name, damage in [("index.faiss", b"not faiss"), ("chunks.json", b'{"documents": {'),
                         ("meta.json", b"[1, 2]")]:
        broken = shutil.copytree(kb.path, tmp_path / f"broken-{name}")
        (broken / name).write_bytes(damage)
        fails(broken, "corrupt")
    short = shutil.copytree(kb.path, tmp_path / "short")
    store = json.loads((short / "chunks.json").read_text())
    (short / "chunks.json").write_text(json.dumps({**store, "chunks": store["chunks"][1:]}))
    fails(short, "does not match")

    other = write_docs(tmp_path / "notes", {"keep.txt": "mine"})
    with pytest.raises(GuardtuneError, match="not a knowledge index; refusing"):
        ingest(KB, other, log=quiet)
    assert (other / "keep.txt").read_text() == "mine"


def test_recall_on_the_example_knowledge_base(kb, tmp_path):
    questions = load_questions(KB_QUESTIONS)
    report = recall_at_k(kb, questions, k=10)
    print("\nexample KB: " + "  ".join(f"{k} {v:.3f}" for k, v in report.items() if k.startswith(("recall", "mrr"))))
    assert report["questions"] == len(questions) >= 40
    assert report["recall@1"] <= report["recall@3"] <= report["recall@5"] <= report["recall@10"]
    assert report["recall@5"] >= 0.8

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "source": "warranty.md"}\n{"question": "q"}\n')
    with pytest.raises(GuardtuneError, match=r"bad.jsonl:2: needs"):
        load_questions(bad)
    with pytest.raises(GuardtuneError, match="not in the index: nowhere.md"):
        recall_at_k(kb, [{"question": "q", "source": "nowhere.md"}])


def test_cli_ingests_and_evaluates(tmp_path, monkeypatch, capsys):
    write_docs(tmp_path / "docs", DOCS)
    done = run_cli("-m", "rag.cli", "ingest", "docs", "--index", "small", "--chunk-tokens", "64", "--overlap", "8",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("rag ingest: 4 added, 0 updated, 0 removed, 0 unchanged documents")
    assert "indexes/small" in done.stdout and "rag: embedded 4/4 chunks" in done.stderr
    assert json.loads((tmp_path / "indexes" / "small" / "meta.json").read_text())["chunk_tokens"] == 64

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "How does sourdough rise?", "source": "bread.md"}) + "\n")
    monkeypatch.chdir(tmp_path)
    assert rag_main(["eval", "--index", "small", "--questions", str(questions), "--k", "3"]) == 0
    assert "rag eval: 1 questions on indexes/small: recall@1 1.000  recall@3 1.000  MRR 1.000" in capsys.readouterr().out

    missing = run_cli("-m", "rag.cli", "ingest", "no-such-dir", "--index", "small", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.splitlines() == ["error: no-such-dir: no such directory"]
