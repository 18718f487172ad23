"""What the grading tests use: reference fixtures, comparisons that record their errors, an independent
finite-difference gradient, and replays of the reference's calls.

Independence: an exercise's tests never call the student's other exercises. Where the graded function
calls other ops (the block backward calls every op's backward), `replay` swaps those ops for the
reference's recorded calls: the same inputs get the reference's outputs, from the fixture.
"""
import copy
import json
import os
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"

# filled by assert_close / check_gradient during one test, read (and reset) by the grading plugin
RECORD = {"max_abs": None, "max_rel": None, "heatmaps": []}


def reset_record():
    RECORD.update(max_abs=None, max_rel=None, heatmaps=[])


def _note(abs_err, rel_err):
    for key, value in (("max_abs", abs_err), ("max_rel", rel_err)):
        if RECORD[key] is None or value > RECORD[key] or value != value:
            RECORD[key] = float(value)


# ---------------------------------------------------------------------------------------------------
# fixtures


class Fixture(dict):
    """The arrays of one exercise's .npz (float64 references), with `meta` (seed, config, generator)."""
    meta: dict


def load_fixture(exercise):
    path = FIXTURES / f"{exercise}.npz"
    if not path.exists():
        raise FileNotFoundError(f"fixture {path} is missing: run `llama3np exercises fixtures` in the solved package")
    with np.load(path, allow_pickle=False) as z:
        fx = Fixture({k: z[k] for k in z.files if k != "_meta"})
        fx.meta = json.loads(str(z["_meta"]))
    return fx


# ---------------------------------------------------------------------------------------------------
# comparisons


def errors(actual, expected):
    """(max |a - e|, max |a - e| / max |e|): the relative error is scale-free over the whole array."""
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    diff = np.abs(a - e)
    abs_err = float(np.max(diff, initial=0.0)) if np.all(np.isfinite(a)) else float("nan")
    scale = float(np.max(np.abs(e), initial=0.0))
    rel_err = abs_err / scale if scale > 0 else abs_err
    return abs_err, rel_err


def assert_close(actual, expected, what, rtol=1e-10, atol=1e-12):
    """Fail with the shapes or the max abs / max rel error of `what`; record both for the grade table."""
    if actual is None:
        raise AssertionError(f"{what}: got None (did the function forget to return it?)")
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {actual.shape}, expected {expected.shape}")
    abs_err, rel_err = errors(actual, expected)
    _note(abs_err, rel_err)
    if not (abs_err <= atol or rel_err <= rtol):
        raise AssertionError(f"{what}: max abs error {abs_err:.3g}, max rel error {rel_err:.3g} "
                             f"(allowed: abs {atol:g} or rel {rtol:g})")


def numeric_grad(f, x, h=1e-6):
    """d f(x) / d x by central differences, on a copy of x (the grader's own: ex01 is an exercise)."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = f(x)
        x[i] = old - h
        fm = f(x)
        x[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


def check_gradient(what, analytic, numeric, rtol=1e-6, exercise=None):
    """Compare an analytic gradient with finite differences; on failure save a heat map of the difference."""
    try:
        assert_close(analytic, numeric, f"gradient {what} vs central differences", rtol=rtol, atol=1e-9)
    except AssertionError:
        a = np.asarray(analytic, dtype=np.float64)
        if a.shape == np.shape(numeric) and a.size:
            from .heatmap import save_gradient_heatmap

            out = Path(os.environ.get("LLAMA3NP_GRADE_ARTIFACTS") or Path.cwd())
            name = f"{exercise or 'grad'}_{''.join(c if c.isalnum() else '_' for c in what)}.png"
            try:
                RECORD["heatmaps"].append(str(save_gradient_heatmap(a, numeric, out / name, what)))
            except Exception:  # a picture must never hide the failure itself
                pass
        raise


# ---------------------------------------------------------------------------------------------------
# recorded calls of the reference: flatten (nested tuples / namedtuples of arrays) into npz keys


def flatten(obj, prefix, arrays):
    """-> a JSON tree with arrays replaced by their keys in `arrays`."""
    if isinstance(obj, np.ndarray):
        arrays[prefix] = obj
        return {"a": prefix}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"v": obj}
    if isinstance(obj, (np.floating, np.integer)):
        return {"v": obj.item()}
    if isinstance(obj, (tuple, list)):
        kind = type(obj).__name__ if hasattr(obj, "_fields") else type(obj).__name__
        return {"t": kind, "items": [flatten(o, f"{prefix}.{i}", arrays) for i, o in enumerate(obj)]}
    raise TypeError(f"cannot record a {type(obj).__name__} at {prefix}")


def unflatten(tree, arrays, types=None):
    if "a" in tree:
        return np.array(arrays[tree["a"]])
    if "v" in tree:
        return tree["v"]
    items = [unflatten(t, arrays, types) for t in tree["items"]]
    kind = tree["t"]
    if kind == "list":
        return items
    if types and kind in types:
        return types[kind](*items)
    return tuple(items)


def _arrays(obj):
    """The arrays inside nested tuples/lists, in order (scalars and None are not compared)."""
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [a for o in obj for a in _arrays(o)]
    return []


def _inputs_match(args, expected, rtol=1e-8):
    got, want = _arrays(args), _arrays(expected)
    if len(got) != len(want):
        return False, f"{len(got)} arrays, the reference passes {len(want)}"
    for a, e in zip(got, want):
        if a.shape != e.shape:
            return False, f"shape {a.shape}, the reference passes {e.shape}"
        if not np.array_equal(a, e):
            _, rel = errors(a, e)
            if not rel <= rtol:
                return False, f"max rel difference {rel:.3g} from the reference's input"
    return True, ""


def replay(monkeypatch, fx, key, targets):
    """Replace each `module.name` in targets by the reference's recorded calls stored under `key`.

    A call whose inputs match a recorded call (any order) returns that call's recorded output; any other
    input fails the test naming the op, because the graded code passed it something the reference never
    does (a wrong gradient flowing into it)."""
    calls = json.loads(str(fx[f"{key}.calls"]))
    for module, name in targets:
        recorded = [(unflatten(c["args"], fx), unflatten(c["out"], fx)) for c in calls if c["name"] == name]

        def fake(*args, _name=name, _recorded=recorded, **kwargs):
            reasons = []
            for rec_args, out in _recorded:
                ok, why = _inputs_match(list(args) + [kwargs[k] for k in sorted(kwargs)], rec_args)
                if ok:
                    return copy.deepcopy(out)  # the caller may add into it in place (dh += dout)
                reasons.append(why)
            raise AssertionError(f"{_name} was called with inputs the reference never passes it "
                                 f"({'; '.join(sorted(set(reasons))[:2]) or 'never called'}): check what flows into it")

        monkeypatch.setattr(module, name, fake)


def record_calls(targets, store, key, arrays):
    """Context manager (fixture generation): wrap module.name for each target and log its calls."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        originals = [(m, n, getattr(m, n)) for m, n in targets]
        log = []
        for m, n, fn in originals:
            def wrapped(*args, _fn=fn, _n=n, **kwargs):
                logged = copy.deepcopy(list(args) + [kwargs[k] for k in sorted(kwargs)])  # before any
                out = _fn(*args, **kwargs)  # in-place change by the caller (dh += dout) can alter them
                log.append((_n, logged, copy.deepcopy(out)))
                return out
            setattr(m, n, wrapped)
        try:
            yield
        finally:
            for m, n, fn in originals:
                setattr(m, n, fn)
            calls = []
            for i, (n, args, out) in enumerate(log):
                calls.append({"name": n, "args": flatten(list(args), f"{key}.{i}.in", arrays),
                              "out": flatten(out, f"{key}.{i}.out", arrays)})
            store[f"{key}.calls"] = np.array(json.dumps(calls))
    return ctx()
