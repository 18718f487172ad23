"""The exercise system itself: catalogue and regions agree, the solved package gets full points, the
student version fails loudly where it should (inverted validation), the reports keep their shape.

The per-exercise grading tests live in llama3np/exercises/tests (shipped with the package, so
`llama3np check` finds them from any directory); tests/exercises/README.md says why.
"""
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from llama3np.exercises import catalogue, cli, fixtures, grader, mutants, regions, student, testing

ROOT = Path(__file__).resolve().parent.parent


def test_every_exercise_has_regions_hints_tests_and_a_fixture():
    """Each catalogue entry: 3 hints, a test file, >= 1 marked region in the listed files, for the listed functions."""
    found = regions.find_regions(ROOT)
    for e in catalogue.EXERCISES:
        assert len(e.hints) == 3 and all(h.strip() for h in e.hints), e.id
        assert (grader.TESTS_DIR / e.tests).exists(), f"{e.id}: no {e.tests}"
        mine = [r for r in found if r.exercise == e.id]
        assert mine, f"{e.id}: no BEGIN SOLUTION {e.id} region in the sources"
        assert {r.path for r in mine} <= set(e.files), f"{e.id}: regions in {sorted({r.path for r in mine})}"
        marked = {r.function for r in mine}
        assert all(any(f.split(".")[-1] == m.split(".")[-1] for m in marked) for f in e.functions), \
            f"{e.id}: catalogue names {e.functions}, regions are in {marked}"
    assert {r.exercise for r in found} <= set(catalogue.BY_ID), "a region names an exercise not in the catalogue"
    assert len({e.tests for e in catalogue.EXERCISES}) == len(catalogue.EXERCISES), "two exercises share a test file"


def test_a_region_becomes_a_stub_that_keeps_the_signature_and_docstring():
    """Python regions become `raise NotImplementedError("exNN: implement f ... run: llama3np check exNN")`;
    C regions a comment and the catalogue's statement; bad markers are refused with the line."""
    text = 'def f(x):\n    """doc"""\n    # BEGIN SOLUTION ex99\n    return x + 1\n    # END SOLUTION\n'
    new, found = regions.strip_text(text, "m.py")
    assert found[0].function == "f" and found[0].body == ["    return x + 1"]
    assert 'def f(x):\n    """doc"""\n' in new and "return x + 1" not in new
    assert 'raise NotImplementedError("ex99: implement f' in new and "run: llama3np check ex99" in new
    ns = {}
    exec(new, ns)
    with pytest.raises(NotImplementedError, match="ex99"):
        ns["f"](1)
    c = "void g(int n, float *y) {\n    /* BEGIN SOLUTION ex98 */\n    y[0] = n;\n    /* END SOLUTION */\n}\n"
    new, found = regions.strip_text(c, "k.c", {"ex98": "y[0] = 0.0f / 0.0f;"})
    assert found[0].function == "g" and "y[0] = n;" not in new and "y[0] = 0.0f / 0.0f;" in new
    with pytest.raises(ValueError, match="m.py:1: END SOLUTION without"):
        regions.find_in_text("    # END SOLUTION\n", "m.py")
    with pytest.raises(ValueError, match="never closed"):
        regions.find_in_text("    # BEGIN SOLUTION ex1\n", "m.py")


def test_fixtures_regenerate_bit_for_bit_with_their_seed_and_config(tmp_path):
    """`llama3np exercises fixtures` writes the same arrays as the committed ones; each records seed and config."""
    ids = ["ex02", "ex05b", "ex09", "ex15"]
    from llama3np import backend

    before = backend.get_backend()
    assert cli.main(["exercises", "fixtures", *ids, "--out", str(tmp_path)]) == 0
    assert backend.get_backend() == before, "making fixtures must leave the process's backend as it was"
    for i in ids:
        new, old = np.load(tmp_path / f"{i}.npz"), np.load(testing.FIXTURES / f"{i}.npz")
        assert sorted(new.files) == sorted(old.files), i
        for k in new.files:
            assert np.array_equal(new[k], old[k]), f"{i}:{k} differs: regenerate the fixtures"
        meta = json.loads(str(old["_meta"]))
        assert meta["seed"] == fixtures.SEED and "config" in meta and meta["generated_by"]
        assert all(old[k].dtype == np.float64 for k in old.files if old[k].dtype.kind == "f"), f"{i}: not float64"


def test_the_solved_package_gets_full_points_json_and_junit(tmp_path, monkeypatch):
    """`llama3np check` from another directory: every exercise passes; JSON and JUnit keep their shape."""
    monkeypatch.chdir(tmp_path)
    out_json, out_xml = tmp_path / "points.json", tmp_path / "report.xml"
    assert cli.main(["check", "--json", str(out_json), "--junit", str(out_xml)]) == 0
    points = json.loads(out_json.read_text())
    assert set(points) == {"exercises", "total", "max_total"}
    assert set(points["exercises"]) == set(catalogue.BY_ID)
    for ex, p in points["exercises"].items():
        assert set(p) == {"status", "points", "max_points"}
        assert p["status"] == "pass" and p["points"] == p["max_points"] == catalogue.get(ex).points, (ex, p)
    assert points["total"] == points["max_total"] == sum(e.points for e in catalogue.EXERCISES)
    suites = ET.parse(out_xml).getroot()
    assert {s.get("name") for s in suites} == set(catalogue.BY_ID)
    assert all(s.get("failures") == "0" and s.get("skipped") == "0" for s in suites)


def test_unknown_exercise_and_bad_hint_are_one_line_errors(capsys):
    """A misspelt id exits 2 naming the known ids; ex05 selects ex05a and ex05b."""
    assert cli.main(["check", "ex99"]) == 2
    assert "unknown exercise 'ex99'" in capsys.readouterr().err
    assert [e.id for e in grader.select(["ex05"])] == ["ex05a", "ex05b"]


def test_a_failing_gradient_shows_hint_1_its_error_and_a_heat_map(tmp_path):
    """Scoring a wrong backward: status fail, partial points, the message, hint 1, and a PNG heat map."""
    from llama3np.exercises.heatmap import save_gradient_heatmap

    png = save_gradient_heatmap(np.ones((3, 4)), np.zeros((3, 4)), tmp_path / "g.png", "dx")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    e = catalogue.get("ex04b")
    records = [{"file": e.tests, "name": "a", "doc": "a check", "status": "pass", "max_abs": 0.0, "max_rel": 0.0,
                "heatmaps": [], "message": ""},
               {"file": e.tests, "name": "b", "doc": "the gradient", "status": "fail", "max_abs": 0.5,
                "max_rel": 0.2, "heatmaps": [str(png)], "message": "gradient dx: max abs error 0.5"}]
    [r] = grader.score([e], records)
    assert r.status == "fail" and r.points == 5.0
    table = grader.format_table([r], hint=1)
    assert "hint 1/3" in table and "hint 2/3" not in table and "--hint 2" in table
    assert "max abs error 0.5" in table and str(png) in table and "5.0e-01" in table
    assert "hint 3/3" in grader.format_table([r], hint=3)


def test_gate_tests_earn_nothing_but_zero_the_rest_when_they_fail():
    """ex22: points are the fraction of mutants caught, and 0 if the student's tests fail on correct code."""
    e = catalogue.get("ex22")

    def rec(status, gate):
        return {"file": e.tests, "name": "t", "doc": "", "status": status, "max_abs": None, "max_rel": None,
                "heatmaps": [], "message": "", "gate": gate}
    caught_3_of_4 = [rec("pass", True)] + [rec("pass", False)] * 3 + [rec("fail", False)]
    assert grader.score([e], caught_3_of_4)[0].points == round(e.points * 0.75, 2)
    assert grader.score([e], [rec("fail", True)] + [rec("pass", False)] * 4)[0].points == 0.0


def test_every_mutant_differs_from_the_correct_code():
    """Each mutant of the bank gives a different answer from the correct function on some input."""
    rng = np.random.default_rng(0)
    x2 = rng.standard_normal((3, 4))
    inputs = {"softmax": [(x2,), (x2 * 400,), (np.array([[0.0, 1.0], [-2000.0, -2001.0]]),)],
              "rmsnorm": [(x2, np.arange(1.0, 5.0), 1e-2), (np.zeros((2, 4)), np.ones(4), 1e-5)],
              "rope": [(rng.standard_normal((1, 3, 2, 8)), 0), (rng.standard_normal((1, 3, 2, 8)), 5)]}
    for family, bank in mutants.MUTANTS.items():
        good = mutants.CORRECT[family]
        for name, (bad, _) in bank.items():
            with np.errstate(all="ignore"):
                differs = any(not np.allclose(bad(*a), good(*a), equal_nan=False) for a in inputs[family])
            assert differs, f"mutant {family}/{name} is indistinguishable on these inputs"


@pytest.mark.slow
def test_the_student_version_fails_loudly_and_grades_each_exercise_alone(tmp_path):
    """Inverted validation: in the student version every test reports 'not attempted', no solution line is
    left, import llama3np resolves to it; then one exercise solved (ex02), one wrongly (ex04b): ex02
    passes while every other exercise is still a stub, ex04b fails with hint 1 and a heat map."""
    out = tmp_path / "student"
    summary = student.make(out, strict=True)
    assert all(s["status"] == "not attempted" and s["tests"] >= 1 for s in summary["exercises"].values())
    assert set(summary["exercises"]) == set(catalogue.BY_ID) and summary["solution_lines_searched"] > 100
    ops_py = out / "llama3np" / "ops.py"
    text = ops_py.read_text()
    assert "np.add.at(dweight" not in text and 'raise NotImplementedError("ex02: implement embedding_backward' in text
    # a student solves ex02 and writes a wrong ex04b (no projection term)
    stub_02 = text.index("# YOUR CODE HERE (ex02)")
    line_end = text.index("\n", text.index("raise NotImplementedError", stub_02))
    text = text[:stub_02] + "dweight = np.zeros(shape, dtype=dout.dtype)\n    np.add.at(dweight, tokens.reshape(-1), " \
        "dout.reshape(-1, shape[1]))\n    return dweight" + text[line_end:]
    stub_04 = text.index("# YOUR CODE HERE (ex04b)")
    line_end = text.index("\n", text.index("raise NotImplementedError", stub_04))
    text = text[:stub_04] + "return rstd * dout * weight, np.sum(dout * xhat, axis=(0, 1))" + text[line_end:]
    ops_py.write_text(text)
    env = dict(os.environ, PYTHONPATH=str(out))
    proc = subprocess.run([sys.executable, "-m", "llama3np.exercises.cli", "check", "ex02", "ex04b", "ex05b",
                           "--json", str(tmp_path / "p.json"), "--artifacts", str(tmp_path / "maps")],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    points = json.loads((tmp_path / "p.json").read_text())["exercises"]
    assert points["ex02"]["status"] == "pass", proc.stdout
    assert points["ex04b"]["status"] == "fail" and points["ex05b"]["status"] == "not attempted", proc.stdout
    assert proc.returncode == 1 and "hint 1/3" in proc.stdout and "heat map" in proc.stdout
    assert list((tmp_path / "maps").glob("ex04b_*.png")), "no heat map saved for the failed gradient check"
    # require() in the student version names what to finish first
    proc = subprocess.run([sys.executable, "-c", "from llama3np.exercises import require; require('ex02', 'ex05')"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "finish ex05a, ex05b first" in proc.stderr
    shutil.rmtree(out)


@pytest.mark.slow
def test_exercises_whose_solutions_call_another_exercise_still_pass_alone():
    """rope_backward calls rope_forward, learn_merges calls merge: solved alone (every other exercise a stub),
    ex06b and ex13b still pass, because their tests hand those calls the grader's own versions.
    (`llama3np exercises independence --build-kernels` checks all of them: every one passes.)"""
    assert student.independence(["ex06b", "ex13b"]) == {"ex06b": "pass", "ex13b": "pass"}
