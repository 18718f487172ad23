"""The grader behind `llama3np check`: run the exercises' tests (pytest, in a fresh process), print a
table per test, give points, write JSON and JUnit XML.

The tests are shipped inside the package (llama3np/exercises/tests) and run with PYTHONPATH set to the
folder holding this very package, so `llama3np check` from any directory grades the package it belongs
to with that package's tests (a student's copy grades the student's code, even beside another install).
"""
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import List, NamedTuple

from . import catalogue

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # .../llama3np
TESTS_DIR = Path(__file__).resolve().parent / "tests"
PASS, FAIL, NOT_ATTEMPTED = "pass", "fail", "not attempted"


class Result(NamedTuple):
    exercise: str
    status: str
    points: float
    max_points: int
    tests: List[dict]


def select(ids=None):
    """Exercises for these ids (all if empty); an id may be a prefix: ex05 -> ex05a, ex05b."""
    if not ids:
        return list(catalogue.EXERCISES)
    chosen = []
    for i in ids:
        match = [e for e in catalogue.EXERCISES if e.id == i] or \
                [e for e in catalogue.EXERCISES if e.id.startswith(i) and e.id[len(i):].isalpha()]
        if not match:
            catalogue.get(i)  # raises with the list of ids
        chosen += [e for e in match if e not in chosen]
    return chosen


def run_tests(exercises, artifacts=None, timeout=900, extra_args=()):
    """pytest over the exercises' test files in a subprocess -> list of per-test records.

    The C exercise runs in a process of its own: a segfault in a student's kernel fails that exercise
    ("the test process crashed") instead of taking every other exercise's grade with it."""
    import importlib.util

    missing = [m for m in ("pytest", "hypothesis") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"llama3np check runs the exercises' tests with pytest and hypothesis ({', '.join(missing)} "
                         "missing): pip install -e '.[test]'")
    present = [e for e in exercises if (TESTS_DIR / e.tests).exists()]
    native = [e for e in present if any(f.endswith((".c", ".h")) for f in e.files)]
    groups = [g for g in ([e for e in present if e not in native], native) if g]
    return [r for g in groups for r in _run_pytest([e.tests for e in g], artifacts, timeout, extra_args)]


def _run_pytest(test_files, artifacts, timeout, extra_args):
    import importlib.util

    with tempfile.TemporaryDirectory(prefix="llama3np-check-") as tmp:
        report = Path(tmp) / "report.json"
        ini = Path(tmp) / "pytest.ini"
        ini.write_text("[pytest]\naddopts =\n")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_DIR.parent)] +
                                            ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["LLAMA3NP_GRADE_REPORT"] = str(report)
        env["LLAMA3NP_GRADE_ARTIFACTS"] = str(artifacts or Path(tempfile.gettempdir()) / "llama3np-check")
        env.setdefault("MPLBACKEND", "Agg")
        env.pop("PYTEST_ADDOPTS", None)
        # a student's endless loop fails its own test after a minute (pytest-timeout, the [test] extra)
        per_test = ["-o", "timeout=60"] if importlib.util.find_spec("pytest_timeout") else []
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "llama3np.exercises._plugin", "-p", "no:cacheprovider",
               "-c", str(ini), "--rootdir", str(TESTS_DIR), "-o", "console_output_style=classic",
               "--tb=no", "-rN", *per_test, *extra_args, *[str(TESTS_DIR / f) for f in test_files]]
        try:
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ValueError(f"the grading run took more than {timeout} s (an endless loop without pytest-timeout? "
                             "pip install -e '.[test]')") from None
        if report.exists():
            return json.loads(report.read_text())
        # the process died (a segfault in C code, os._exit, ...): every test of these files fails, saying so
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or [""]
        return [{"file": f, "name": "(process)", "doc": "the tests run to the end", "status": FAIL,
                 "max_abs": None, "max_rel": None, "heatmaps": [], "gate": False,
                 "message": f"the test process crashed (exit code {proc.returncode}; a segfault in C code?) {tail[0][:200]}"}
                for f in test_files]


def score(exercises, records):
    """Per exercise: status (pass / fail / not attempted), points (the passed fraction of max_points)."""
    results = []
    for e in exercises:
        tests = [r for r in records if r["file"] == e.tests]
        n = len(tests)
        passed = sum(r["status"] == PASS for r in tests)
        if n == 0:
            status = FAIL
            tests = [{"name": "(none)", "status": FAIL, "doc": "the exercise has tests", "max_abs": None,
                      "max_rel": None, "heatmaps": [], "message": f"no test found in {e.tests}"}]
        elif passed == n:
            status = PASS
        elif all(r["status"] == NOT_ATTEMPTED for r in tests):
            status = NOT_ATTEMPTED
        else:
            status = FAIL
        # gate tests (e.g. "your property tests pass on the correct code") earn nothing themselves: they
        # must pass for the others to count, so ex22's score is exactly the fraction of mutants caught
        gates = [r for r in tests if r.get("gate")]
        graded = [r for r in tests if not r.get("gate")] or tests
        earned = sum(r["status"] == PASS for r in graded) / len(graded) if n else 0.0
        if any(r["status"] != PASS for r in gates):
            earned = 0.0
        points = round(e.points * earned, 2)
        results.append(Result(e.id, status, points, e.points, tests))
    return results


def to_json(results):
    return {"exercises": {r.exercise: {"status": r.status, "points": r.points, "max_points": r.max_points}
                          for r in results},
            "total": round(sum(r.points for r in results), 2),
            "max_total": sum(r.max_points for r in results)}


def to_junit(results):
    """JUnit XML (GitHub Classroom, Gradescope): a testsuite per exercise, not attempted = skipped."""
    suites = ET.Element("testsuites", name="llama3np exercises")
    for r in results:
        suite = ET.SubElement(suites, "testsuite", name=r.exercise, tests=str(len(r.tests)),
                              failures=str(sum(t["status"] == FAIL for t in r.tests)),
                              skipped=str(sum(t["status"] == NOT_ATTEMPTED for t in r.tests)))
        ET.SubElement(ET.SubElement(suite, "properties"), "property", name="points",
                      value=f"{r.points}/{r.max_points}")
        for t in r.tests:
            case = ET.SubElement(suite, "testcase", classname=f"{r.exercise}", name=t["name"])
            if t["status"] == FAIL:
                ET.SubElement(case, "failure", message=t["message"]).text = t["doc"]
            elif t["status"] == NOT_ATTEMPTED:
                ET.SubElement(case, "skipped", message=t["message"] or "not attempted")
    return ET.tostring(suites, encoding="unicode")


def _fmt(x):
    return "-" if x is None else f"{x:.1e}"


def format_table(results, hint=1):
    """The report: a header per exercise, a line per test (status, errors, what it checks), hints."""
    lines = []
    mark = {PASS: "pass", FAIL: "FAIL", NOT_ATTEMPTED: "not attempted"}
    for r in results:
        e = catalogue.get(r.exercise)
        lines.append(f"{r.exercise}  {e.title}  [{mark[r.status]}]  {r.points:g}/{r.max_points} points")
        lines.append(f"  {'status':<14}{'max abs':>9} {'max rel':>9}  what it checks")
        said = set()
        for t in r.tests:
            lines.append(f"  {mark[t['status']]:<14}{_fmt(t['max_abs']):>9} {_fmt(t['max_rel']):>9}  {t['doc']}")
            if t["status"] != PASS and t["message"] and t["message"] not in said:
                lines.append(f"  {'':<14}{'':>20}  -> {t['message']}")
                said.add(t["message"])  # a stub's message once, not under every test
            for h in t.get("heatmaps") or ():
                lines.append(f"  {'':<14}{'':>20}  heat map of the gradient error: {h}")
        if r.status == FAIL or (hint > 1 and r.status != PASS):
            for k in range(max(1, hint)):
                lines.append(f"  hint {k + 1}/3: {e.hints[k]}")
            if hint < 3:
                lines.append(f"  (more: llama3np check {r.exercise} --hint {hint + 1})")
        elif r.status == NOT_ATTEMPTED:
            lines.append(f"  functions to write: {', '.join(e.functions)} in {', '.join(e.files)}")
        lines.append("")
    total = to_json(results)
    lines.append(f"total: {total['total']:g} / {total['max_total']} points; "
                 f"{sum(r.status == PASS for r in results)} passed, "
                 f"{sum(r.status == FAIL for r in results)} failed, "
                 f"{sum(r.status == NOT_ATTEMPTED for r in results)} not attempted")
    return "\n".join(lines)


def grade(ids=None, hint=1, json_path=None, junit_path=None, artifacts=None):
    """Run, score and write the reports -> list of Result."""
    if hint not in (1, 2, 3):
        raise ValueError(f"--hint must be 1, 2 or 3, got {hint}")
    exercises = select(ids)
    results = score(exercises, run_tests(exercises, artifacts))
    from ..fileio import atomic_write_bytes

    if json_path:
        atomic_write_bytes(json_path, (json.dumps(to_json(results), indent=2) + "\n").encode())
    if junit_path:
        atomic_write_bytes(junit_path, to_junit(results).encode())
    return results


# ---------------------------------------------------------------------------------------------------
# for notebooks


def check(*ids, hint=1):
    """Grade these exercises and print the table (a notebook's check cell); returns True if all pass.

    Never raises on a failing exercise: the notebook reads the same in the solved package (it passes) and in
    the student version (it says what is missing)."""
    results = grade(list(ids), hint=hint)
    print(format_table(results, hint))
    _show_heatmaps(results)
    return all(r.status == PASS for r in results)


def _show_heatmaps(results):
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return
    if get_ipython() is None:
        return
    for r in results:
        for t in r.tests:
            for h in t.get("heatmaps") or ():
                display(Image(filename=h))


class ExercisesNotDone(RuntimeError):
    """A notebook cell needs exercises that do not pass yet."""


def require(*ids):
    """Stop a notebook cell early, naming the exercises to finish first, instead of failing deep inside.

    Fast: it calls nothing heavier than the stubs' own NotImplementedError check (a source scan)."""
    missing = [e.id for e in select(list(ids)) if _has_stub(e)]
    if missing:
        raise ExercisesNotDone(f"finish {', '.join(missing)} first (llama3np check {' '.join(missing)})")
    return True


def _has_stub(exercise):
    """True if a file of the exercise still holds its stub (the package's or csrc's copy)."""
    from .regions import STUB_MARK

    root = PACKAGE_DIR.parent
    for f in exercise.files:
        p = root / f
        if p.exists() and f"{STUB_MARK} ({exercise.id})" in p.read_text(encoding="utf-8"):
            return True
    return False
