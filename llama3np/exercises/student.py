"""`llama3np exercises make --out DIR`: the student version, and its self-check (inverted validation).

The student version is a copy of the repository's package, csrc, notebooks, setup files and README with
every solution region replaced by its stub. It checks itself and fails loudly when:
  - solution text is left (every line of every stripped region that appears nowhere else in the solved
    sources is searched for in every copied file);
  - an exercise has no test, or a test collected against the student version passes (each must fail or
    report "not attempted");
  - `import llama3np` run in DIR (cwd=DIR, PYTHONPATH=DIR) loads anything but DIR's package, or the
    command line's --help does not run.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import catalogue
from .regions import find_regions, find_in_text, strip_text

ROOT_FILES = ("setup.py", "pyproject.toml", "README.md", "LICENSE")
COPY_DIRS = ("llama3np", "csrc", "notebooks")
SKIP_SUFFIXES = (".so", ".pyd", ".dll", ".dylib", ".o", ".pyc")
SKIP_DIRS = ("__pycache__", ".ipynb_checkpoints", ".hypothesis", ".pytest_cache")
MIN_LINE = 12  # shorter solution lines ("return dx", "else:") are everywhere and prove nothing


class SelfCheckError(RuntimeError):
    """The student version is not fit to hand out: the message says why."""


def solved_root():
    """The repository holding this package (the solutions)."""
    return Path(__file__).resolve().parent.parent.parent


def _copy_tree(src_root, out):
    copied = []
    for d in COPY_DIRS:
        for p in sorted((src_root / d).rglob("*")):
            rel = p.relative_to(src_root)
            if p.is_dir() or any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts) \
                    or p.name.endswith(SKIP_SUFFIXES):
                continue
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dest)
            copied.append(rel)
    for f in ROOT_FILES:
        if (src_root / f).exists():
            shutil.copy2(src_root / f, out / f)
            copied.append(Path(f))
    return copied


def make(out, src_root=None, check=True, build_kernels=False, strict=False):
    """Write the student version into `out` (which must be empty or absent) and self-check it.
    Returns the self-check's summary dict; raises SelfCheckError when the version is not fit."""
    src_root = Path(src_root or solved_root())
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty: choose a new folder (nothing is overwritten)")
    regions = find_regions(src_root)
    unknown = sorted({r.exercise for r in regions} - set(catalogue.BY_ID))
    if unknown:
        raise SelfCheckError(f"regions marked with exercises that are not in the catalogue: {unknown}")
    out.mkdir(parents=True, exist_ok=True)
    _copy_tree(src_root, out)
    c_stubs = {e.id: e.c_stub for e in catalogue.EXERCISES}
    for path in sorted({r.path for r in regions}):
        text = (out / path).read_text(encoding="utf-8")
        new, _ = strip_text(text, path, c_stubs)
        (out / path).write_text(new, encoding="utf-8")
    _write_exercise_list(out)
    if build_kernels:
        _build_kernels(out)
    return self_check(out, src_root, strict) if check else {}


def independence(ids=None, src_root=None, build_kernels=False):
    """Any order really works: for each exercise, a student version where ONLY that exercise is solved
    (every other region a stub) must grade it "pass". -> {exercise id: status}.

    The C exercise needs its kernels built (build_kernels=True); without, it is reported "skipped"."""
    import tempfile

    from . import grader

    src_root = Path(src_root or solved_root())
    c_stubs = {e.id: e.c_stub for e in catalogue.EXERCISES}
    files = sorted({r.path for r in find_regions(src_root)})
    chosen = sorted(grader.select(ids), key=lambda e: any(f.endswith(".c") for f in e.files))  # C last
    results = {}
    with tempfile.TemporaryDirectory(prefix="llama3np-independence-") as tmp:
        out = Path(tmp) / "student"
        make(out, src_root, check=False)
        for e in chosen:
            for path in files:
                (out / path).write_text(strip_text((src_root / path).read_text(encoding="utf-8"), path, c_stubs,
                                                   keep={e.id})[0], encoding="utf-8")
            if any(f.endswith(".c") for f in e.files):
                if not build_kernels:
                    results[e.id] = "skipped (C: build_kernels=False)"
                    continue
                _build_kernels(out)
            report = Path(tmp) / f"{e.id}.json"
            subprocess.run([sys.executable, "-m", "llama3np.exercises.cli", "check", e.id, "--json", str(report)],
                           cwd=tmp, env=_env(out), capture_output=True, text=True)
            results[e.id] = json.loads(report.read_text())["exercises"][e.id]["status"] if report.exists() \
                else "error (no report)"
    return results


def _write_exercise_list(out):
    lines = ["# Exercises", "", "Fill in each stub (search for `YOUR CODE HERE`), then grade it: "
             "`llama3np check exNN` (`--hint 2`, `--hint 3` for more help). Any order works: every "
             "exercise is graded against reference fixtures, never against your other exercises.", "",
             "| id | title | write | in | points | notebook |", "|---|---|---|---|---|---|"]
    for e in catalogue.EXERCISES:
        lines.append(f"| {e.id} | {e.title} | {', '.join(e.functions)} | {', '.join(e.files)} | {e.points} "
                     f"| {e.section} |")
    lines.append("")
    lines.append("The C exercise (ex18) needs the kernels rebuilt after each edit: `python csrc/build_kernels.py`.")
    (out / "EXERCISES.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _build_kernels(out):
    proc = subprocess.run([sys.executable, str(out / "csrc" / "build_kernels.py"), "--tmp",
                           str(out / "build" / "cffi")], cwd=out, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SelfCheckError(f"building the student version's C kernels failed:\n{proc.stderr[-2000:]}")


def _env(out):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(out)
    env.pop("PYTEST_ADDOPTS", None)
    return env


def solution_lines(src_root):
    """{line: (path, exercise)} for region lines that appear nowhere outside the regions."""
    src_root = Path(src_root)
    regions = find_regions(src_root)
    inside = {}
    for r in regions:
        for line in r.body:
            s = line.strip()
            if len(s) >= MIN_LINE:
                inside.setdefault(s, (r.path, r.exercise))
    outside = set()
    for p in _text_files(src_root, COPY_DIRS):
        text = p.read_text(encoding="utf-8", errors="replace")
        rel = p.relative_to(src_root).as_posix()
        lines = text.splitlines()
        masked = set()
        if "BEGIN SOLUTION" in text:
            for r in find_in_text(text, rel):
                masked.update(range(r.begin, r.end + 1))
        outside.update(line.strip() for i, line in enumerate(lines) if i not in masked)
    return {s: where for s, where in inside.items() if s not in outside}


def _text_files(root, dirs):
    for d in dirs:
        for p in sorted((Path(root) / d).rglob("*")):
            if p.is_file() and not p.name.endswith(SKIP_SUFFIXES + (".npz", ".png")) \
                    and not any(part in SKIP_DIRS for part in p.parts):
                yield p


def self_check(out, src_root=None, strict=False):
    """Inverted validation of a student version in `out`; raises SelfCheckError listing every problem.
    strict: a test must report "not attempted" (a plain failure is a problem too)."""
    out = Path(out).resolve()
    src_root = Path(src_root or solved_root())
    problems = []
    # 1. no solution text left
    secret = solution_lines(src_root)
    leaks = []
    for p in list(_text_files(out, COPY_DIRS)) + [out / f for f in ROOT_FILES if (out / f).exists()]:
        for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            s = line.strip()
            if s in secret:
                leaks.append(f"{p.relative_to(out)}:{n}: solution line of {secret[s][1]} ({secret[s][0]}): {s[:70]}")
    if leaks:
        problems.append(f"{len(leaks)} solution line(s) left:\n    " + "\n    ".join(leaks[:20]))
    left = [r for r in find_regions(out)]
    if left:
        problems.append(f"{len(left)} region(s) still marked: " + ", ".join(f"{r.path}:{r.begin + 1}" for r in left))
    # 2. import llama3np resolves to DIR's package, and the command line starts
    proc = subprocess.run([sys.executable, "-c", "import llama3np, llama3np.cli; print(llama3np.__file__)"],
                          cwd=out, env=_env(out), capture_output=True, text=True)
    where = proc.stdout.strip()
    if proc.returncode != 0:
        problems.append(f"`import llama3np` fails in the student version:\n{proc.stderr[-1500:]}")
    elif Path(where).resolve().parent != out / "llama3np":
        problems.append(f"`import llama3np` in {out} loads {where}, not the student package")
    proc = subprocess.run([sys.executable, "-m", "llama3np", "--help"], cwd=out, env=_env(out),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        problems.append(f"`python -m llama3np --help` fails in the student version:\n{proc.stderr[-1500:]}")
    # 3. every exercise has tests, and none of them passes against the stubs
    grade_json = out / ".selfcheck.json"
    proc = subprocess.run([sys.executable, "-m", "llama3np.exercises.cli", "check", "--json", str(grade_json),
                           "--records", str(out / ".selfcheck-tests.json")],
                          cwd=out, env=_env(out), capture_output=True, text=True)
    summary = {"exercises": {}, "tests": 0}
    if not grade_json.exists():
        problems.append(f"the grader did not run in the student version:\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
    else:
        graded = json.loads(grade_json.read_text())
        records = json.loads((out / ".selfcheck-tests.json").read_text())
        grade_json.unlink()
        (out / ".selfcheck-tests.json").unlink()
        for e in catalogue.EXERCISES:
            tests = [r for r in records if r["file"] == e.tests]
            status = graded["exercises"][e.id]["status"]
            summary["exercises"][e.id] = {"tests": len(tests), "status": status,
                                          "statuses": sorted({t["status"] for t in tests})}
            if not tests:
                problems.append(f"{e.id} has no test (expected tests in {e.tests})")
            for t in tests:
                if t["status"] == "pass":
                    problems.append(f"{e.id}: test {t['name']} PASSES against the stub (it cannot tell a "
                                    f"missing solution from a right one)")
                elif t["status"] == "fail" and strict:
                    problems.append(f"{e.id}: test {t['name']} fails against the stub instead of reporting "
                                    f"'not attempted': {t['message']}")
        summary["tests"] = len(records)
        summary["total"], summary["max_total"] = graded["total"], graded["max_total"]
    if problems:
        raise SelfCheckError("the student version is not fit to hand out:\n  - " + "\n  - ".join(problems))
    summary["solution_lines_searched"] = len(secret)
    return summary
