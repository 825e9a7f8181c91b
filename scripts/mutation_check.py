"""Mutation check: does the test suite catch realistic one-line bugs in the core paths?

Each entry of ``MUTATIONS`` is a one-line bug (a collective dropped or put on the wrong group, an offset lost, a
factor missing) in one file, with the few fast tests that should fail because of it. The working tree (tracked
files and untracked files git does not ignore) is copied once to a temporary snapshot, with ``.venv`` and
``artifacts`` symlinked from this checkout so nothing is rebuilt; every selected mutation gets a fresh copy of that
snapshot, is applied there and its tests run there:

    .venv/bin/python -m pytest -q -x -p no:cacheprovider <node ids>      (cwd = the copy)

Exit status 1 (a test failed) is "caught", 0 is "survived", anything else (collection error, timeout) is "error".
First the union of the selected mutations' tests runs once on an unmutated copy (the baseline): a mutation
counts as caught only when its tests pass without it.

The copy's own code must be what the tests import, also in ranks that the tests fork or launch: the project is
installed editable into .venv (a finder that maps ``train``, ``model``, ``data``, ``launch`` to this checkout),
so every pytest process gets PYTHONPATH=<copy>, which path-based imports consult before that finder, and each
copy is checked to resolve those packages to itself (from its own directory and from an unrelated one, as a rank
launched elsewhere would) before any test runs.

Usage (from the repository root, after ``make data``):

    .venv/bin/python scripts/mutation_check.py --list
    .venv/bin/python scripts/mutation_check.py                       # all mutations, baseline first
    .venv/bin/python scripts/mutation_check.py --only moe-lb-no-E mamba-chunk-carry --out runs/mutations.md
    .venv/bin/python scripts/mutation_check.py --only tp-mamba-norm-world --tests <node id> ...   # try other tests

Exit status: 0 when the baseline passed and every selected mutation was caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINKED = (".venv", "artifacts")  # shared with the copies, not copied: the environment and the prepared data
PACKAGES = ("train", "model", "data", "launch")
PYTEST = ("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider")
TAIL_LINES = 40  # of a failed baseline's or an erroring run's output, printed


from mutations import MUTATIONS, Mutation


@dataclass
class Outcome:
    mutation: Mutation
    tests: tuple[str, ...]
    result: str  # caught | survived | error | baseline-failed
    seconds: float
    detail: str = ""
    log: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ the copy
def tree_files(repo: Path) -> list[str]:
    """Tracked files and untracked files git does not ignore, as they are in the working tree now."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         check=True, capture_output=True).stdout.decode()
    return sorted({name for name in out.split("\0") if name})


def make_copy(repo: Path, files: Sequence[str], parent: Path, prefix: str = "mutant-") -> Path:
    copy = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    for name in files:
        if name.split("/", 1)[0] in LINKED:
            continue
        src = repo / name
        if not src.is_symlink() and not src.exists():  # deleted in the working tree, not yet in the index
            continue
        dst = copy / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)
    for name in LINKED:
        if (repo / name).exists():
            (copy / name).symlink_to(repo / name)
    return copy


def check_mutation(repo: Path, m: Mutation) -> str:
    """The file's text with ``m`` applied; raises ValueError when ``m`` is malformed or does not apply once."""
    if "\n" in m.original or "\n" in m.replacement or not m.original.strip():
        raise ValueError(f"mutation {m.id}: original and replacement must be one line (original non-empty)")
    if m.original == m.replacement:
        raise ValueError(f"mutation {m.id}: the replacement equals the original")
    path = repo / m.file
    if not path.is_file():
        raise ValueError(f"mutation {m.id}: {m.file} does not exist")
    text = path.read_text()
    count = text.count(m.original)
    if count != 1:
        raise ValueError(f"mutation {m.id}: the original text occurs {count} times in {m.file}, expected exactly once:"
                         f"\n    {m.original}")
    if m.replacement == "":  # a deleted line: the original must be all of its line's code
        start = text.index(m.original)
        line_start, line_end = text.rfind("\n", 0, start) + 1, text.find("\n", start)
        line = text[line_start:line_end if line_end != -1 else len(text)]
        if line.strip() != m.original:
            raise ValueError(f"mutation {m.id}: deleting part of a line; give the whole line's code:\n    {line}")
    return text.replace(m.original, m.replacement)


def env_for(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VIRTUAL_ENV"):
        env.pop(key, None)
    # Path-based imports come before the editable install's finder (which maps to this checkout): the copy's code
    # in the pytest process, and in every rank started from it, wherever its working directory is.
    env["PYTHONPATH"] = str(copy)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports_from(copy: Path, python: Path) -> None:
    """The copy's interpreter finds the project's packages in the copy, from the copy and from elsewhere."""
    code = ("import importlib.util; "
            f"print('\\n'.join(importlib.util.find_spec(p).origin for p in {PACKAGES!r}))")
    for cwd in (copy, Path(tempfile.gettempdir())):
        out = subprocess.run([str(python), "-c", code], cwd=cwd, env=env_for(copy), check=True, capture_output=True,
                             text=True).stdout.split()
        wrong = [origin for origin in out if not Path(origin).resolve().is_relative_to(copy.resolve())]
        if wrong or len(out) != len(PACKAGES):
            raise RuntimeError(f"from {cwd} the copy imports {wrong or out}, not its own packages in {copy}")


def run_pytest(copy: Path, tests: Sequence[str], timeout: float, extra: Sequence[str] = (),
               exitfirst: bool = True) -> tuple[int | None, str]:
    """(pytest's exit status or None on timeout, its output)."""
    python = copy / ".venv" / "bin" / "python"
    options = [o for o in PYTEST if exitfirst or o != "-x"]
    cmd = [str(python), *options, *extra, *tests]
    # A session of its own, so a timed-out run's forked ranks and data workers go with it.
    proc = subprocess.Popen(cmd, cwd=copy, env=env_for(copy), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


def classify(code: int | None) -> str:
    return {0: "survived", 1: "caught"}.get(code, "error") if code is not None else "error"


def clone(snapshot: Path, parent: Path) -> Path:
    """A fresh copy of the snapshot (its .venv and artifacts stay symlinks)."""
    copy = Path(tempfile.mkdtemp(prefix="mutant-", dir=parent))
    shutil.copytree(snapshot, copy, symlinks=True, dirs_exist_ok=True)
    return copy


# ------------------------------------------------------------------------------------------ baseline
def junit_outcomes(path: Path) -> dict[str, str]:
    """node id -> passed / failed / skipped, from pytest's JUnit XML (tests outside classes, as this suite's)."""
    outcomes: dict[str, str] = {}
    if not path.exists():
        return outcomes
    for case in ET.parse(path).iter("testcase"):
        parts = case.get("classname", "").split(".")
        # classname is the module's dotted path, plus a class name when the test sits in a class
        module, klass = (parts, []) if not parts[-1][:1].isupper() else (parts[:-1], parts[-1:])
        node = "/".join(module) + ".py::" + "::".join([*klass, case.get("name", "")])
        kinds = {child.tag for child in case}
        outcomes[node] = ("failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds
                          else "passed")
    return outcomes


def baseline_status(test: str, outcomes: dict[str, str]) -> str:
    """passed when every collected test under the node id ``test`` passed (and there was one)."""
    matched = [o for node, o in outcomes.items()
               if node == test or node.startswith((test + "[", test + "::")) or test.endswith(".py")
               and node.startswith(test + "::")]
    if not matched:
        return "not run"
    return "passed" if all(o == "passed" for o in matched) else "failed" if "failed" in matched else "skipped"


# ------------------------------------------------------------------------------------------ report
def markdown_table(outcomes: Sequence[Outcome]) -> str:
    rows = ["| id | file | bug | test | result | s |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        m = o.mutation
        bug = f"`{m.original}` → " + (f"`{m.replacement}`" if m.replacement else "(line deleted)")
        bug = bug.replace("|", "\\|")
        tests = "<br>".join(f"`{t}`" for t in o.tests)
        result = o.result + (f" ({o.detail})" if o.detail else "")
        rows.append(f"| {m.id} | `{m.file}` | {m.description}: {bug} | {tests} | {result} | {o.seconds:.0f} |")
    return "\n".join(rows) + "\n"


def write_log(directory: Path | None, name: str, text: str) -> None:
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{name}.log").write_text(text)


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-lines:])


# ------------------------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print the mutations and exit")
    p.add_argument("--only", nargs="+", metavar="ID", help="run only these mutations")
    p.add_argument("--tests", nargs="+", metavar="NODE", help="run these node ids instead of the mutations' own")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="run the tests on an unmutated copy first (default: on)")
    p.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per pytest run before it counts as error")
    p.add_argument("--logs", type=Path, help="write each pytest run's output to <this dir>/<id>.log")
    p.add_argument("--keep", action="store_true", help="keep the temporary copies (their paths are printed)")
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where the copies go")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    by_id = {m.id: m for m in MUTATIONS}
    if len(by_id) != len(MUTATIONS):
        raise SystemExit("mutation ids must be unique")
    unknown = sorted(set(args.only or ()) - set(by_id))
    if unknown:
        raise SystemExit(f"unknown mutation ids {unknown}; --list shows them")
    selected = [by_id[i] for i in args.only] if args.only else [m for m in MUTATIONS if m.default or args.list]
    try:
        for m in selected:
            check_mutation(REPO, m)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if args.list:
        for m in selected:
            note = "" if m.default else "  (only with --only)"
            print(f"{m.id}{note}\n    {m.file}: {m.description}")
            print(f"    - {m.original}\n    + {m.replacement or '(deleted)'}")
            print("".join(f"    test: {t}\n" for t in (args.tests or m.tests)), end="")
        return 0
    python = REPO / ".venv" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"error: {python} is missing; run `make venv` (or `make data`) first")

    tests_of = {m.id: tuple(args.tests or m.tests) for m in selected}
    started = time.monotonic()
    # One snapshot of the working tree, taken now, for the baseline and every mutant: files others edit while this
    # runs do not make a mutant's tests differ from the baseline's.
    snapshot = make_copy(REPO, tree_files(REPO), args.tmp, prefix="mutation-snapshot-")
    copies: list[Path] = [snapshot]

    def fresh_copy() -> Path:
        copy = clone(snapshot, args.tmp)
        copies.append(copy)
        check_imports_from(copy, python)
        return copy

    try:
        base: dict[str, str] = {}
        baseline_ok = True
        if args.baseline:
            union = list(dict.fromkeys(t for m in selected for t in tests_of[m.id]))
            copy = fresh_copy()
            junit = copy.parent / f"{copy.name}-baseline.xml"
            t0 = time.monotonic()
            print(f"baseline: {len(union)} test node(s) on the unmutated copy {copy}", flush=True)
            # No -x: every test's own baseline outcome is wanted.
            code, out = run_pytest(copy, union, args.timeout * len(union), [f"--junitxml={junit}"], exitfirst=False)
            outcomes = junit_outcomes(junit)
            write_log(args.logs, "baseline", out)
            junit.unlink(missing_ok=True)
            if not args.keep:
                shutil.rmtree(copy, ignore_errors=True)
                copies.remove(copy)
            base = {t: baseline_status(t, outcomes) for t in union}
            bad = {t: s for t, s in base.items() if s != "passed"}
            baseline_ok = code == 0 and not bad
            verdict = "passed" if baseline_ok else f"FAILED (exit {code})"
            print(f"baseline: {verdict}, {time.monotonic() - t0:.0f} s", flush=True)
            for t, s in bad.items():
                print(f"    {s}: {t}")
            if not baseline_ok:
                print(tail(out), flush=True)

        results: list[Outcome] = []
        for i, m in enumerate(selected, start=1):
            tests = tests_of[m.id]
            t0 = time.monotonic()
            not_passing = [t for t in tests if base and base.get(t) != "passed"]
            if not_passing:
                outcome = Outcome(m, tests, "baseline-failed", 0.0, f"{len(not_passing)} test(s) fail unmutated")
            else:
                copy = fresh_copy()
                try:
                    (copy / m.file).write_text(check_mutation(copy, m))
                except ValueError as err:  # the file changed between the check above and the snapshot
                    code, out, result, detail = None, str(err), "error", "does not apply"
                else:
                    code, out = run_pytest(copy, tests, args.timeout)
                    result = classify(code)
                    detail = "timeout" if code is None else f"exit {code}" if result == "error" else ""
                outcome = Outcome(m, tests, result, time.monotonic() - t0, detail, out.splitlines())
                write_log(args.logs, m.id, out)
                if not args.keep:
                    shutil.rmtree(copy, ignore_errors=True)
                    copies.remove(copy)
            results.append(outcome)
            print(f"[{i}/{len(selected)}] {m.id}: {outcome.result}"
                  f"{f' ({outcome.detail})' if outcome.detail else ''}, {outcome.seconds:.0f} s", flush=True)
            if outcome.result == "error":
                print(tail("\n".join(outcome.log)), flush=True)

        table = markdown_table(results)
        total = time.monotonic() - started
        print()
        print(table, end="")
        caught = sum(o.result == "caught" for o in results)
        print(f"\n{caught}/{len(results)} caught; baseline {'passed' if baseline_ok else 'FAILED'}; {total:.0f} s")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(table)
        return 0 if baseline_ok and caught == len(results) else 1
    finally:
        if args.keep:
            print("copies kept:", *copies, sep="\n    ")
        else:
            for copy in copies:
                shutil.rmtree(copy, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
