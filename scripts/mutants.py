#!/usr/bin/env python3
"""Mutation check for the qcow2 engine: does the test suite notice when a rule breaks?

Each mutant in tests/mutants/mutant_set.py names one rule the README promises, a file of
the package, an exact piece of its source (the anchor: a line or two), what to put
there instead, and the fast tests that should fail ("kill" it).  For each mutant
this tool copies the tree to a scratch directory (never touching the tree it runs
from), applies the one change, runs the mutant's tests with a time limit, and puts
the file back.  A mutant whose tests still pass "survived": the suite would not
notice that bug.  An anchor that is missing or not unique fails that mutant loudly
(code moved: update the anchor in mutant_set.py).

  scripts/mutants.py                     # every mutant
  scripts/mutants.py flush-no-data-sync  # some, by name (shell-style patterns work)
  scripts/mutants.py --list              # names, files and rules
  scripts/mutants.py --baseline ...      # first run each test subset unmutated (must pass)
  scripts/mutants.py --rules > docs/rules.md  # the rules as Markdown (a test keeps it current)

Prints `mutant | killed/survived | by which test | seconds` and `N passed, M failed`
(passed = killed).  Exit status 0 only if every selected mutant was killed.  Uses the
worktree's .venv (scripts/test creates it).  Not part of CI: a full run takes a while.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SET = ROOT / "tests" / "mutants" / "mutant_set.py"
# Files a mutant may change: the package's own modules, the engine and the FUSE layer and
# command line above it (the access rules live there); never the tests.
ENGINE = re.compile(r"^qcowfuse/[\w/]+\.py$")


def load_set(path: Path) -> list:
    name = "_mutants_set_" + path.stem  # a set file may itself import mutant_set
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    names = [m.name for m in mod.MUTANTS]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise SystemExit(f"mutants: duplicate mutant names in {path}: {sorted(dupes)}")
    for m in mod.MUTANTS:
        if not ENGINE.match(m.file):
            raise SystemExit(f"mutants: {m.name}: {m.file} is not a file of the package")
    return mod.MUTANTS


def scratch_copy(dest: Path) -> None:
    """Tracked and untracked (not ignored) files of the tree, as they are now."""
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.split(b"\0")
    for name in files:
        if not name:
            continue
        src = ROOT / os.fsdecode(name)
        if not src.is_file():
            continue  # deleted but still tracked
        dst = dest / os.fsdecode(name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def venv_python() -> str:
    py = Path(os.environ.get("QCOWFUSE_VENV", ROOT / ".venv")) / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"mutants: no {py}: run scripts/test once to create the venv")
    return str(py)


def pytest_env(scratch: Path) -> dict:
    env = dict(os.environ)
    # the scratch copy's package wins over the venv's editable install of ROOT (also in
    # daemons started with `python -m qcowfuse`); no stale bytecode across mutants
    env["PYTHONPATH"] = str(scratch) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def assert_imports_scratch(py: str, scratch: Path) -> None:
    r = subprocess.run([py, "-c", "import qcowfuse; print(qcowfuse.__file__)"], cwd=scratch,
                       env=pytest_env(scratch), capture_output=True, text=True)
    where = r.stdout.strip()
    if r.returncode or not where.startswith(str(scratch)):
        raise SystemExit(f"mutants: the scratch copy does not import its own qcowfuse ({where or r.stderr})")


# pytest's short summary (-rfE): "FAILED tests/x.py::name[param] - message"
FAILED = re.compile(r"^(?:FAILED|ERROR) (tests/.+?)(?: - .*)?$", re.M)


def run_tests(py: str, scratch: Path, tests: list[str], timeout: float,
              verbose: bool = False) -> tuple[str, str, float]:
    """(outcome, detail, seconds): outcome 'pass', 'fail', 'timeout' or 'error'."""
    cmd = [py, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rfE", *tests]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=scratch, env=pytest_env(scratch), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # pytest and whatever it started (daemons unmount themselves)
        proc.communicate()
        return "timeout", f"time limit {timeout:.0f}s", time.monotonic() - t0
    secs = time.monotonic() - t0
    if verbose:  # the assertion that killed it: "E ..." lines of the first failure
        why = [line for line in out.splitlines() if line.startswith("E ")][:6]
        print("\n".join("    " + line for line in why), flush=True)
    if proc.returncode == 0:
        return "pass", "", secs
    if proc.returncode == 1:
        m = FAILED.search(out)
        return "fail", m.group(1) if m else "(a test failed)", secs
    tail = " / ".join(out.strip().splitlines()[-3:])
    return "error", f"pytest exit {proc.returncode}: {tail}", secs


def apply(scratch: Path, m) -> tuple[Path, str] | str:
    """Apply mutant m in the scratch copy: (file, original text), or why it cannot."""
    path = scratch / m.file
    text = path.read_text()
    n = text.count(m.find)
    if n != 1:
        return f"anchor {'not found' if n == 0 else f'found {n} times'} in {m.file}: {m.find!r}"
    mutated = text.replace(m.find, m.replace)
    try:
        compile(mutated, str(path), "exec")
    except SyntaxError as e:
        return f"mutated {m.file} does not compile: {e}"
    path.write_text(mutated)
    return path, text


SECTION = re.compile(r"^\s*# -- (.+?)\s*$")
MUTANT_NAME = re.compile(r"""\bMutant\(\s*["']([^"']+)["']""")


def sections(path: Path) -> dict[str, str]:
    """mutant name -> the `# -- ...` section comment above it in the set file."""
    out: dict[str, str] = {}
    current = ""
    for line in path.read_text().splitlines():
        m = SECTION.match(line)
        if m:
            current = m.group(1)
            continue
        for name in MUTANT_NAME.findall(line):
            out.setdefault(name, current)
    return out


def rules_markdown(mutants: list, set_path: Path) -> str:
    """docs/rules.md: each rule, the mutant that breaks it, its file and the tests that
    must kill it, grouped by the set file's section comments (in the set's order)."""
    where = sections(set_path)
    try:
        shown = set_path.resolve().relative_to(ROOT)
    except ValueError:
        shown = set_path
    lines = [
        "# The engine's rules and the tests that enforce them",
        "",
        f"Generated by `scripts/mutants.py --rules` from `{shown}`: do not edit by hand",
        "(tests/test_mutants_tool.py fails when this file and the mutant set differ).",
        "",
        "Each line is one rule the engine keeps, the mutant that breaks it (`scripts/mutants.py",
        "NAME` applies it to a scratch copy and runs the tests), the file it changes, and the",
        "tests that must fail with it.",
    ]
    groups: dict[str, list] = {}
    for m in mutants:
        groups.setdefault(where.get(m.name, ""), []).append(m)
    for title, ms in groups.items():
        lines += ["", f"## {title or 'Other rules'}", ""]
        for m in ms:
            tests = ", ".join(f"`{t}`" for t in m.tests) or "(none)"
            lines.append(f"- {m.rule or '(no rule text)'}: `{m.name}` in `{m.file}`; killed by {tests}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (shell patterns); default all")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--rules", action="store_true",
                    help="print the rules as Markdown (docs/rules.md) and exit")
    ap.add_argument("--set", type=Path, default=DEFAULT_SET, help="mutant set file (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per mutant (default: its own)")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="print the assertion that killed each mutant")
    ap.add_argument("--baseline", action="store_true",
                    help="run each distinct test subset unmutated first; it must pass")
    args = ap.parse_args()
    mutants = load_set(args.set)
    if args.names:
        chosen = [m for m in mutants if any(fnmatch.fnmatchcase(m.name, p) for p in args.names)]
        unknown = [p for p in args.names if not any(fnmatch.fnmatchcase(m.name, p) for m in mutants)]
        if unknown:
            print(f"mutants: no mutant matches {', '.join(unknown)} (see --list)", file=sys.stderr)
            return 2
        mutants = chosen
    if args.rules:
        sys.stdout.write(rules_markdown(mutants, args.set))
        return 0
    if args.list:  # with each anchor's state in the tree as it is now
        width = max(len(m.name) for m in mutants)
        bad = 0
        for m in mutants:
            path = ROOT / m.file
            n = path.read_text().count(m.find) if path.exists() else 0
            state = "ok" if n == 1 else ("ANCHOR NOT FOUND" if n == 0 else f"ANCHOR FOUND {n}x")
            if n == 0:  # code moved (image.py split?): say where the anchor is now
                moved = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "qcowfuse").rglob("*.py"))
                         if ENGINE.match(str(p.relative_to(ROOT))) and m.find in p.read_text()]
                if moved:
                    state += f" (now in {', '.join(moved)})"
            bad += n != 1
            print(f"{m.name:<{width}}  {m.file:<28} {state:<6} {m.rule}")
        return 1 if bad else 0

    py = venv_python()
    with tempfile.TemporaryDirectory(prefix="qcowfuse-mutants-") as tmp:
        scratch = Path(tmp) / "tree"
        scratch_copy(scratch)
        assert_imports_scratch(py, scratch)
        if args.baseline:
            subsets = {tuple(m.tests) for m in mutants}
            for tests in subsets:
                outcome, detail, secs = run_tests(py, scratch, list(tests), 1800)
                print(f"baseline {' '.join(tests)}: {outcome} {detail} ({secs:.0f}s)", flush=True)
                if outcome != "pass":
                    print("mutants: a test subset fails without any mutant; fix that first",
                          file=sys.stderr)
                    return 2
        rows = []
        print(f"{'mutant':<34} | {'result':<8} | {'by which test':<70} | seconds", flush=True)
        for m in mutants:
            applied = apply(scratch, m)
            if isinstance(applied, str):
                result, detail, secs = "ERROR", applied, 0.0
            else:
                path, original = applied
                try:
                    outcome, detail, secs = run_tests(py, scratch, m.tests, args.timeout or m.timeout,
                                                     args.verbose)
                finally:
                    path.write_text(original)
                result = {"pass": "survived", "fail": "killed", "timeout": "killed",
                          "error": "ERROR"}[outcome]
                if outcome == "pass":
                    detail = "(all of: " + " ".join(m.tests) + ")"
            rows.append((m.name, result))
            print(f"{m.name:<34} | {result:<8} | {detail:<70} | {secs:.0f}", flush=True)
    passed = sum(1 for _, r in rows if r == "killed")
    failed = len(rows) - passed
    survivors = [n for n, r in rows if r != "killed"]
    if survivors:
        print("not killed: " + ", ".join(survivors))
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
