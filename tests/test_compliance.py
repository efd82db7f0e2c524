"""Output compliance: approved-script store, stage fallbacks with sticky variants, enforce and monitor."""

from __future__ import annotations

import asyncio
import json

import pytest

from guardrails.compliance import Compliance
from guardrails.scanners.pii import PII
from guardrails.scripts import ScriptStore, build_store, load_library
from kernel.encoder import embed
from kernel.errors import GuardtuneError
from tests.conftest import ROOT

LIBRARY = ROOT / "examples" / "guardrails" / "scripts.yaml"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "scripts"
    build_store(LIBRARY, out, log=lambda m: None)
    return ScriptStore.load(out)


def test_store_holds_exact_cosine_scores_with_an_id_map(store):
    lib = load_library(LIBRARY)
    assert store.index.ntotal == len(lib.scripts) and store.version == "1"
    target = next(s for s in lib.scripts if s.id == "price-battery")
    match = store.nearest(embed([target.text])[0], "pricing")
    assert match.script.id == "price-battery" and match.score == pytest.approx(1.0, abs=1e-5)


def test_nearest_is_limited_to_the_stage_plus_global(store):
    vec = embed(["The Kestrel Vault 10 battery is $7,900 installed."])[0]
    assert store.nearest(vec, "pricing").script.id == "price-battery"
    in_greeting = store.nearest(vec, "greeting")
    assert in_greeting.script.stage in ("greeting", "*")
    thanks = store.nearest(embed(["Thank you so much!"])[0], "closing")
    assert thanks.script.id == "any-thanks"  # global scripts are valid in every stage


def test_decisions_script_fallback_and_sticky_variants(store):
    comp = Compliance(store, output_scanners=[PII()])
    close = comp.decide("A Vault 10 battery costs 7,900 dollars including installation.", stage="pricing",
                        session_id="s1", threshold=0.6)
    assert close.outcome == "script" and close.script_id == "price-battery" and close.sent == store.scripts[9].text
    far = comp.decide("I like turtles and long walks.", stage="pricing", session_id="s1", threshold=0.6)
    assert far.outcome == "fallback" and far.sent in store.fallbacks["pricing"] and far.fallback_stage == "pricing"
    variants = {comp.decide("I like turtles.", stage="pricing", session_id=f"user-{i}", threshold=0.6).fallback_variant
                for i in range(40)}
    assert variants == {0, 1}  # both variants are in use across sessions
    again = [comp.decide("Turtles!", stage="pricing", session_id="user-7", threshold=0.6).fallback_variant
             for _ in range(3)]
    assert len(set(again)) == 1  # and each session keeps its own
    universal = comp.decide("Turtles!", stage="unknown_stage", session_id="s", threshold=0.6)
    assert universal.fallback_stage == "*" and universal.sent == store.fallbacks["*"][0]
    leak = comp.decide("Sure, email the installer at bob@example.com for the battery price.", stage="pricing",
                       session_id="s", threshold=0.1)
    assert leak.outcome == "fallback" and leak.reason.startswith("pii")


def test_stage_inference_from_the_users_words(store):
    comp = Compliance(store)
    assert comp.infer_stage("How much is the wallbox?", previous=None) == "pricing"
    assert comp.infer_stage("qwzx", previous="closing") == "closing"


def test_bad_library_and_corrupt_store_are_refused(tmp_path, store):
    bad = tmp_path / "lib.yaml"
    bad.write_text("scripts:\n  - {id: a, stage: s, text: x}\n  - {id: a, stage: s, text: y}\n")
    with pytest.raises(GuardtuneError, match="duplicate script id 'a'"):
        build_store(bad, tmp_path / "out", log=lambda m: None)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text(json.dumps({"format": 1, "scripts": []}))
    (broken / "scripts.faiss").write_bytes(b"not faiss")
    with pytest.raises(GuardtuneError, match="missing or corrupt"):
        ScriptStore.load(broken)


def test_monitor_records_but_sends_the_raw_reply(store, tmp_path):
    from serving.config import ComplianceConfig
    from serving.pipeline import ChatContext
    from serving.stages import ComplianceStage, GuardScope

    cfg = ComplianceConfig(store=store.path, mode="monitor", threshold=0.6, sessions_db=tmp_path / "s.db",
                           per_task={"strict": {"mode": "enforce", "threshold": 0.99}})
    stage = ComplianceStage(cfg, GuardScope(["sales", "strict"]))
    ctx = ChatContext("r1", "sales", [{"role": "user", "content": "How much is the battery?"}], session_id="abc")
    raw = "It is around 7000 dollars."
    assert asyncio.run(stage.after(ctx, raw)) == raw and not stage.buffers("sales")
    assert ctx.report["output"]["mode"] == "monitor" and ctx.report["output"]["stage"] == "pricing"
    assert "raw" not in ctx.report["output"]  # the report goes to the client; the raw reply does not
    assert stage.sessions.get_stage(ctx.scoped_session) == "pricing"  # tracked for the next turn
    strict = ChatContext("r2", "strict", [{"role": "user", "content": "hello"}], session_id="abc",
                         dialogue_stage="closing")
    sent = asyncio.run(stage.after(strict, raw))
    assert stage.buffers("strict") and sent in store.fallbacks["closing"]
    assert asyncio.run(stage.after(ChatContext("r3", "other", []), raw)) == raw  # unguarded task


def test_example_guarded_serve_config_validates():
    from serving.config import load_serve_config

    cfg = load_serve_config(ROOT / "examples" / "serve_guarded.yaml")
    assert cfg.guardrails.tasks == ["sales"] and cfg.guardrails.compliance.mode == "enforce"
    assert load_library(ROOT / cfg.guardrails.compliance.library).fallbacks.keys() >= {
        "greeting", "needs_discovery", "product_info", "pricing", "objection_handling", "closing", "*"}
    assert all(len(v) >= 2 for k, v in load_library(LIBRARY).fallbacks.items() if k != "*")
