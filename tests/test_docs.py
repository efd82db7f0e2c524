"""The newcomer's page and the docs stay true: the generated config reference is current, every file
they point at exists, and every `guardtune`/`train` command they show names subcommands and flags the
CLI has."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

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


def test_the_readme_shows_the_picture_and_links_the_config_reference():
    links = re.findall(r"\]\(((?!https?:)[^)#]+)\)", README)
    assert "docs/architecture.svg" in links and "docs/config.md" in links


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


# --- the pages beside the README ---------------------------------------------------------------------

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "deploy" / "README.md",
         ROOT / "deploy" / "training" / "README.md"]


def test_readme_is_a_newcomers_page_that_points_at_the_rest():
    assert len(README.splitlines()) <= 250
    for page in ("training", "serving", "guardrails", "deploy", "benchmarks", "config", "lora-cpu"):
        assert f"](docs/{page}.md)" in README, page
    # The layers the import contracts hold are the ones the README draws.
    for layer in ("guardtune", "serving  |  training", "guardrails  |  rag", "kernel"):
        assert layer in README, layer
    assert re.search(r"ran \d+ tests in \d+ minutes", README)


def test_every_link_in_the_docs_exists():
    missing = []
    for page in PAGES:
        text = page.read_text()
        for link in re.findall(r"\]\(((?!https?:)[^)#\s]+)(?:#[^)]*)?\)", text):
            if not (page.parent / link).exists():
                missing.append(f"{page.relative_to(ROOT)}: {link}")
        missing += [f"{page.relative_to(ROOT)}: {p}" for p in re.findall(r"`(bench/results/[^`]+)`", text)
                    if not (ROOT / p).exists()]
    assert not missing, missing


def documented_commands(text: str) -> list[str]:
    """`guardtune ...` and `train ...` command lines: in code blocks (not python or yaml) and in
    inline code."""
    found = []
    blocks = re.findall(r"^ *```(\w*)\n(.*?)^ *```", text, re.M | re.S)
    for lang, body in blocks:
        if lang in ("", "sh", "bash", "console"):
            found += [line.strip() for line in body.splitlines()]
    found += re.findall(r"(?<!`)`([^`\n]+)`(?!`)", text)
    out = []
    for cmd in found:
        cmd = re.sub(r"^(\$ |\.venv/bin/)", "", cmd.split(" #")[0].strip())
        if re.match(r"(guardtune|train) [-a-z]", cmd):  # not a log line such as `guardtune LoRA CPU ops on`
            out.append(cmd)
    return out


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def command_problems(cmd: str, parsers: dict[str, argparse.ArgumentParser]) -> list[str]:
    """What in `cmd` its parser does not know: a subcommand or a --flag."""
    prog, *words = shlex.split(cmd)
    parser, problems, value_next = parsers[prog], [], False
    for word in words:
        if value_next:
            value_next = False
        elif word.startswith("--"):
            flag = word.split("=", 1)[0]
            action = parser._option_string_actions.get(flag)
            if action is None:
                problems.append(f"{cmd}: {parser.prog} has no {flag}")
            value_next = action is not None and action.nargs != 0 and "=" not in word
        elif (subs := _subcommands(parser)) and "=" not in word:
            if word not in subs:
                problems.append(f"{cmd}: {parser.prog} has no subcommand {word!r}")
                break
            parser = subs[word]
    return problems


def test_documented_commands_exist_in_the_cli():
    from guardtune.cli import build_parser
    from training import cli as train_cli

    train = argparse.ArgumentParser(prog="train")
    train_cli.add_arguments(train)
    parsers = {"guardtune": build_parser(), "train": train}
    commands = [c for page in PAGES for c in documented_commands(page.read_text())]
    assert len(commands) > 40 and any(c.startswith("train ") for c in commands)
    problems = [p for c in commands for p in command_problems(c, parsers)]
    assert not problems, "\n".join(problems)


def test_the_command_check_catches_a_stale_flag_and_subcommand():
    from guardtune.cli import build_parser

    parsers = {"guardtune": build_parser()}
    assert command_problems("guardtune serve --config x.yaml", parsers) == []
    assert command_problems("guardtune rag ingest examples/kb --index kb", parsers) == []
    assert command_problems("guardtune audit --task sales --outcome fallback", parsers) == []
    assert command_problems("guardtune serve --no-such-flag", parsers)
    assert command_problems("guardtune servee", parsers)


def test_version_flags():
    from guardtune import __version__

    for prog in ("guardtune", "train"):
        r = subprocess.run([str(Path(sys.executable).parent / prog), "--version"], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0 and r.stdout.strip() == f"{prog} {__version__}", (prog, r.stdout, r.stderr)


def test_every_project_file_the_docs_name_exists():
    """A page that names `serving/chat.py` or `examples/serve_guarded.yaml` follows the code when it moves."""
    roots = "kernel|guardtune|training|serving|guardrails|rag|examples|bench|deploy|scripts|tests|requirements|docs"
    missing = [f"{page.relative_to(ROOT)}: {p}" for page in PAGES
               for p in re.findall(rf"`((?:{roots})/[\w./-]+\.\w+)`", page.read_text())
               if not (ROOT / p).exists() and not p.startswith("tests/artifacts/")]  # what a test run writes
    assert not missing, missing
