"""`llama3np check` and `llama3np exercises make|fixtures|selfcheck|list`.

    llama3np check                         grade every exercise (table per test, points)
    llama3np check ex05b ex06 --hint 2     two exercises (ex06 = ex06a and ex06b), two hints on failure
    llama3np check --json points.json --junit report.xml
    llama3np exercises make --out student/ the student version, self-checked (inverted validation)
    llama3np exercises fixtures            regenerate the reference .npz fixtures from the solutions
    llama3np exercises independence        each exercise solved alone (all others stubs) must pass
"""
import argparse
import json
import sys


def _check(args):
    from . import grader

    results = grader.grade(args.exercises, hint=args.hint, json_path=args.json, junit_path=args.junit,
                           artifacts=args.artifacts)
    if args.records:
        from ..fileio import atomic_write_bytes

        atomic_write_bytes(args.records, json.dumps([dict(t, file=grader.catalogue.get(r.exercise).tests)
                                                     for r in results for t in r.tests]).encode())
    print(grader.format_table(results, args.hint))
    return 0 if all(r.status == grader.PASS for r in results) else 1


def _make(args):
    from . import student

    summary = student.make(args.out, check=not args.no_check, build_kernels=args.build_kernels,
                           strict=args.strict)
    print(f"student version written to {args.out}")
    if summary:
        for ex, s in summary["exercises"].items():
            print(f"  {ex:<6} {s['tests']:>2} tests  {s['status']}")
        print(f"self-check passed: {summary['tests']} tests, none passes against the stubs; "
              f"{summary['solution_lines_searched']} solution lines searched for, none left; "
              f"import llama3np resolves to {args.out}/llama3np")
    return 0


def _selfcheck(args):
    from . import student

    summary = student.self_check(args.dir, strict=args.strict)
    print(json.dumps(summary, indent=1))
    return 0


def _independence(args):
    from . import student

    results = student.independence(args.exercises, build_kernels=args.build_kernels)
    for ex, status in results.items():
        print(f"  {ex:<6} solved alone, every other exercise a stub: {status}")
    bad = [ex for ex, s in results.items() if s not in ("pass",) and not s.startswith("skipped")]
    print("every exercise passes on its own" if not bad else f"NOT independent: {', '.join(bad)}")
    return 1 if bad else 0


def _fixtures(args):
    from . import fixtures

    for path in fixtures.generate(args.exercises, out_dir=args.out):
        print(path)
    return 0


def _list(args):
    from . import catalogue

    for e in catalogue.EXERCISES:
        print(f"{e.id:<6} {e.points:>3}  {e.title}  ({', '.join(e.functions)}; {e.section})")
    return 0


def add_subcommands(subparsers):
    """Add `check` and `exercises` to the `llama3np` command's sub-parsers."""
    p = subparsers.add_parser("check", help="grade the exercises: a table per test, hints, points",
                              description="Run the exercises' tests against this package and print, per test, "
                                          "pass / fail / not attempted, the max abs and rel error and what it "
                                          "checks. Exit code 0 when every selected exercise passes.")
    p.add_argument("exercises", nargs="*", help="exercise ids (default: all); ex05 means ex05a and ex05b")
    p.add_argument("--hint", type=int, choices=(1, 2, 3), default=1, help="hints to show on a failure (default 1)")
    p.add_argument("--json", metavar="FILE", help="write the points as JSON")
    p.add_argument("--junit", metavar="FILE", help="write JUnit XML (GitHub Classroom, Gradescope)")
    p.add_argument("--artifacts", metavar="DIR", help="where heat maps of failed gradient checks go "
                                                      "(default: $TMPDIR/llama3np-check)")
    p.add_argument("--records", metavar="FILE", help=argparse.SUPPRESS)  # per-test records, for the self-check
    p.set_defaults(func=_check)

    ex = subparsers.add_parser("exercises", help="the student version and the exercises' fixtures")
    sub = ex.add_subparsers(dest="exercises_command", required=True)
    m = sub.add_parser("make", help="write the student version (solutions replaced by stubs) and self-check it")
    m.add_argument("--out", required=True, help="a new folder")
    m.add_argument("--no-check", action="store_true", help="skip the self-check")
    m.add_argument("--strict", action="store_true", help="every test must report 'not attempted' (CI)")
    m.add_argument("--build-kernels", action="store_true",
                   help="build the student version's C kernels first, so the C exercise is graded too")
    m.set_defaults(func=_make)
    s = sub.add_parser("selfcheck", help="the inverted validation of an existing student version")
    s.add_argument("dir")
    s.add_argument("--strict", action="store_true")
    s.set_defaults(func=_selfcheck)
    ind = sub.add_parser("independence", help="solve each exercise alone in a student version: it must pass")
    ind.add_argument("exercises", nargs="*", help="exercise ids (default: all)")
    ind.add_argument("--build-kernels", action="store_true", help="also the C exercise (builds the kernels)")
    ind.set_defaults(func=_independence)
    f = sub.add_parser("fixtures", help="regenerate the reference fixtures (float64 .npz) from the solutions")
    f.add_argument("exercises", nargs="*", help="exercise ids (default: all)")
    f.add_argument("--out", help="folder (default: llama3np/exercises/fixtures)")
    f.set_defaults(func=_fixtures)
    ls = sub.add_parser("list", help="the catalogue")
    ls.set_defaults(func=_list)


def main(argv=None) -> int:
    """`llama3np check ... / exercises ...` from Python (tests) or `python -m`: the one command line, llama3np.cli.main,
    so the errors, warnings and exit codes are the same; argv starts with the sub-command."""
    from ..cli import main as llama3np_main

    return llama3np_main(argv)


if __name__ == "__main__":
    sys.exit(main())
