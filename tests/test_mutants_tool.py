"""scripts/mutants.py itself (the full mutation run is not part of CI: see README), and
docs/rules.md, which it generates from the mutant set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "scripts" / "mutants.py"
SETS = ROOT / "tests" / "mutants"  # mutant_set.py

SMOKE_SET = '''
import sys
sys.path.insert(0, {sets!r})
from mutant_set import Mutant

MUTANTS = [
    Mutant("smoke-short-file", "qcowfuse/qcow2/header.py", "if file_size < cs:", "if False:",
           ["tests/test_cli.py::test_file_shorter_than_a_cluster"], "smoke: killed"),
    Mutant("smoke-lost-anchor", "qcowfuse/qcow2/header.py", "no such line in header.py", "pass",
           ["tests/test_cli.py::test_file_shorter_than_a_cluster"], "smoke: anchor not found"),
]
'''


def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, QCOWFUSE_VENV=sys.prefix)
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_mutants_tool_kills_and_fails_loudly_on_a_lost_anchor(tmp_path):
    """One real mutant is killed in a scratch copy (the tree is left alone); a mutant
    whose anchor is gone fails loudly; the summary counts both."""
    header = ROOT / "qcowfuse" / "qcow2" / "header.py"
    before = header.read_bytes()
    set_file = tmp_path / "smoke_set.py"
    set_file.write_text(SMOKE_SET.format(sets=str(SETS)))
    r = run_tool("--set", str(set_file))
    assert header.read_bytes() == before, "the tool changed the tree it runs from"
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    killed = next(l for l in lines if l.startswith("smoke-short-file"))
    assert "| killed" in killed and "test_file_shorter_than_a_cluster" in killed
    lost = next(l for l in lines if l.startswith("smoke-lost-anchor"))
    assert "| ERROR" in lost and "anchor not found" in lost
    assert lines[-1] == "1 passed, 1 failed"
    r = run_tool("--set", str(set_file), "--list")
    assert r.returncode == 1 and "ANCHOR NOT FOUND" in r.stdout
    r = run_tool("--list")
    assert "flush-no-data-sync" in r.stdout


def test_every_mutant_anchor_is_in_its_file_exactly_once():
    """A change to the engine that moves a line a mutant names must move the mutant too
    (otherwise the full mutation run reports it as an error, outside CI); and every test
    a mutant names exists as a file."""
    sys.path.insert(0, str(SETS))
    try:
        from mutant_set import MUTANTS
    finally:
        sys.path.pop(0)
    problems = []
    for m in MUTANTS:
        count = (ROOT / m.file).read_text().count(m.find)
        if count != 1:
            problems.append(f"{m.name}: anchor found {count} times in {m.file}")
        problems += [f"{m.name}: no test file {t}" for t in m.tests
                     if not (ROOT / t.split("::")[0]).is_file()]
    assert not problems, "\n".join(problems)


def test_docs_rules_md_is_what_the_mutant_set_says():
    """docs/rules.md is generated from the mutant set, so it cannot go stale: after a
    change to tests/mutants/mutant_set.py run `scripts/mutants.py --rules > docs/rules.md`."""
    r = run_tool("--rules")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = ROOT / "docs" / "rules.md"
    assert doc.is_file() and doc.read_text() == r.stdout, \
        "docs/rules.md differs from the mutant set: run scripts/mutants.py --rules > docs/rules.md"
