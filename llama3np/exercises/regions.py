"""Find the solution regions in the sources and replace them by stubs.

    # BEGIN SOLUTION ex05b        (nbgrader's delimiters; in C: /* BEGIN SOLUTION ex18 */ or // ...)
    ...
    # END SOLUTION                (C: /* END SOLUTION */)

A region is a run of whole lines inside a function body. Its stub keeps the function's signature and
docstring (they are outside the region) and raises NotImplementedError naming the exercise, so the
module still imports and every other function still works.
"""
import re
from pathlib import Path
from typing import List, NamedTuple

PY_BEGIN = re.compile(r"^(\s*)# BEGIN SOLUTION (ex\w+)\s*$")
PY_END = re.compile(r"^\s*# END SOLUTION\s*$")
C_BEGIN = re.compile(r"^(\s*)(?:/\*|//) BEGIN SOLUTION (ex\w+)\s*(?:\*/)?\s*$")
C_END = re.compile(r"^\s*(?:/\*|//) END SOLUTION\s*(?:\*/)?\s*$")
SOURCE_GLOBS = ("llama3np/**/*.py", "csrc/*.c", "csrc/*.h")
STUB_MARK = "YOUR CODE HERE"


class Region(NamedTuple):
    path: str  # relative to the repository root, with /
    exercise: str
    begin: int  # 0-based line index of the BEGIN marker
    end: int  # 0-based line index of the END marker
    indent: str
    function: str  # the enclosing function (Class.method for methods)
    body: List[str]  # the solution lines between the markers


def _markers(path):
    return (C_BEGIN, C_END) if str(path).endswith((".c", ".h")) else (PY_BEGIN, PY_END)


def _enclosing_function(lines, i, is_c):
    if is_c:
        for j in range(i, -1, -1):
            m = re.match(r"^[A-Za-z_][\w\s\*]*?\b(\w+)\s*\(", lines[j])
            if m:
                return m.group(1)
        return "?"
    indent = len(lines[i]) - len(lines[i].lstrip())
    name, cls = "?", None
    for j in range(i, -1, -1):
        m = re.match(r"^(\s*)(?:async\s+)?def (\w+)|^(\s*)class (\w+)", lines[j])
        if not m:
            continue
        if m.group(2) and len(m.group(1)) < indent and name == "?":
            name, indent = m.group(2), len(m.group(1))
        elif m.group(4) and len(m.group(3)) < indent and name != "?":
            cls = m.group(4)
            break
    return f"{cls}.{name}" if cls else name


def find_in_text(text, path):
    """The regions of one file's text; ValueError for an unmatched or nested marker."""
    begin_re, end_re = _markers(path)
    lines = text.splitlines()
    regions, open_at = [], None
    for i, line in enumerate(lines):
        b, e = begin_re.match(line), end_re.match(line)
        if b:
            if open_at is not None:
                raise ValueError(f"{path}:{i + 1}: BEGIN SOLUTION inside the region opened at line {open_at[0] + 1}")
            open_at = (i, b.group(1), b.group(2))
        elif e:
            if open_at is None:
                raise ValueError(f"{path}:{i + 1}: END SOLUTION without a BEGIN SOLUTION")
            start, indent, ex = open_at
            func = _enclosing_function(lines, start, str(path).endswith((".c", ".h")))
            regions.append(Region(str(path), ex, start, i, indent, func, lines[start + 1:i]))
            open_at = None
    if open_at is not None:
        raise ValueError(f"{path}:{open_at[0] + 1}: BEGIN SOLUTION {open_at[2]} is never closed")
    return regions


def source_files(root):
    root = Path(root)
    files = set()
    for pattern in SOURCE_GLOBS:
        files.update(p for p in root.glob(pattern) if "__pycache__" not in p.parts)
    return sorted(files)


def find_regions(root) -> List[Region]:
    """Every region under root (the package and csrc), in file order."""
    root = Path(root)
    out = []
    for p in source_files(root):
        text = p.read_text(encoding="utf-8")
        if "BEGIN SOLUTION" in text:
            out += find_in_text(text, p.relative_to(root).as_posix())
    return out


def stub_message(exercise, function):
    return (f"{exercise}: implement {function} (hints: llama3np check {exercise} --hint 1, --hint 2, --hint 3); "
            f"run: llama3np check {exercise}")


def stub_lines(region, c_stub=""):
    """The lines that replace a region (markers included)."""
    msg = stub_message(region.exercise, region.function)
    ind = region.indent
    if region.path.endswith((".c", ".h")):
        lines = [f"{ind}/* {STUB_MARK} ({region.exercise}) */", f"{ind}/* {msg} */"]
        return lines + [ind + s for s in (c_stub or "").splitlines()]
    return [f"{ind}# {STUB_MARK} ({region.exercise})", f'{ind}raise NotImplementedError("{msg}")']


def strip_text(text, path, c_stubs=None, keep=()):
    """text with every region (but those of the exercises in `keep`) replaced by its stub -> (new text, regions)."""
    regions = find_in_text(text, path)
    lines = text.splitlines()
    for r in reversed([r for r in regions if r.exercise not in keep]):
        lines[r.begin:r.end + 1] = stub_lines(r, (c_stubs or {}).get(r.exercise, ""))
    return "\n".join(lines) + ("\n" if text.endswith("\n") else ""), regions
