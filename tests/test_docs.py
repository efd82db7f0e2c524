"""The newcomer's page stays true: the generated config reference is current and every file the
README points at exists."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_config_reference_is_generated_from_the_current_schemas():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import config_reference
    finally:
        sys.path.pop(0)
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == config_reference.render(), "docs/config.md is stale: run scripts/config_reference.py"
    for key in ("`method`", "`stage`", "`max_concurrency`", "`on_engine_death`", "`audit_db`"):
        assert key in committed, key


def test_every_linked_file_in_the_readme_exists():
    links = re.findall(r"\]\(((?!https?:)[^)#]+)\)", README)
    cited = re.findall(r"`(bench/results/[^`]+)`", README)
    assert "docs/architecture.svg" in links and "docs/config.md" in links
    missing = [p for p in links + cited if not (ROOT / p).exists()]
    assert not missing, missing


def test_readme_names_exactly_one_test_command_and_ci_runs_it():
    assert README.count("<!-- test-command -->") == 1
    assert re.search(r"<!-- test-command -->`make test`", README)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci and 'eval "$test_cmd"' in ci


def test_the_architecture_picture_is_a_valid_svg():
    import xml.etree.ElementTree as ET

    root = ET.parse(ROOT / "docs" / "architecture.svg").getroot()
    assert root.tag.endswith("svg")
    texts = " ".join(t.text or "" for t in root.iter() if t.tag.endswith("text"))
    for part in ("training/", "serving/", "guardrails/", "rag/", "adapters/", "deploy/"):
        assert part in texts, part


def test_make_demo_runs_the_demo_command():
    out = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "scripts/demo.sh" in out
    assert "guardtune\" demo" in (ROOT / "scripts" / "demo.sh").read_text()
