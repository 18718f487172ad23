"""pytest plugin used by the grader (`-p llama3np.exercises._plugin`): one record per test.

Status: pass; not attempted (the test met a stub's NotImplementedError, or was skipped: e.g. the C
kernels are not built); fail (anything else). Each record carries the test's docstring (what it checks),
the max abs / max rel error of its comparisons and the heat maps of failed gradient checks. The records
go to the JSON file named by LLAMA3NP_GRADE_REPORT.
"""
import json
import os

import pytest

from . import testing

_RESULTS = []


def _first_line(text, limit=300):
    text = (text or "").strip()
    line = text.splitlines()[0] if text else ""
    return line[:limit]


def _not_implemented(excinfo):
    """The NotImplementedError of a stub, also inside an exception group (hypothesis) -> its message."""
    def walk(e, depth=0):
        if e is None or depth > 10:
            return None
        if isinstance(e, NotImplementedError):
            return str(e) or "NotImplementedError"
        for sub in getattr(e, "exceptions", ()) or ():
            found = walk(sub, depth + 1)
            if found:
                return found
        return walk(e.__cause__ or e.__context__, depth + 1)
    return walk(excinfo.value) if excinfo is not None else None


def pytest_configure(config):
    config.addinivalue_line("markers", "gate: must pass for the exercise's other tests to earn points")


def pytest_runtest_setup(item):
    testing.reset_record()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" or (rep.when == "setup" and not rep.passed):
        doc = " ".join((getattr(item, "function", None).__doc__ or item.name).split()) \
            if getattr(item, "function", None) else item.name
        callspec = getattr(item, "callspec", None)
        if callspec is not None:
            doc += f" [{callspec.id}]"
        record = {"nodeid": item.nodeid, "file": item.path.name, "name": item.name, "doc": doc,
                  "max_abs": testing.RECORD["max_abs"], "max_rel": testing.RECORD["max_rel"],
                  "heatmaps": list(dict.fromkeys(testing.RECORD["heatmaps"])), "message": "",
                  "gate": item.get_closest_marker("gate") is not None}
        if rep.passed:
            record["status"] = "pass"
        elif rep.skipped:
            record["status"] = "not attempted"
            reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
            record["message"] = _first_line(reason.replace("Skipped: ", ""))
        else:
            stub = _not_implemented(call.excinfo)
            if stub:
                record["status"], record["message"] = "not attempted", _first_line(stub)
            else:
                record["status"] = "fail"
                crash = getattr(rep.longrepr, "reprcrash", None)
                record["message"] = _first_line(crash.message if crash else str(rep.longrepr))
        _RESULTS.append(record)


def pytest_collectreport(report):
    if report.failed:
        _RESULTS.append({"nodeid": report.nodeid, "file": os.path.basename(report.nodeid.split("::")[0]),
                         "name": "(collection)", "doc": "the test module imports", "status": "fail",
                         "max_abs": None, "max_rel": None, "heatmaps": [],
                         "message": _first_line(str(report.longrepr).strip().splitlines()[-1]
                                                if str(report.longrepr).strip() else "collection failed")})


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("LLAMA3NP_GRADE_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(_RESULTS, f)
