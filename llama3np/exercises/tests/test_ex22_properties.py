"""ex22: your property tests (llama3np/exercises/student_properties.py), graded against mutants.

One test per mutant: it passes when your tests fail on that mutant (caught). Your tests must also pass
on the correct implementation (the `gate` tests: tests that fail on everything catch nothing); then the
points are exactly the fraction of mutants caught.
"""
import pytest

from llama3np.exercises import mutants, student_properties

CASES = [(family, name) for family, bank in mutants.MUTANTS.items() for name in bank]
_CORRECT = {}


def _passes_on_correct_code(family):
    if family not in _CORRECT:
        tests = mutants.student_tests(student_properties, family)
        _CORRECT[family] = ("no test_" + family + "_* function found") if not tests else \
            mutants.run_student_tests(tests, mutants.CORRECT[family], family)
    if _CORRECT[family]:
        raise AssertionError(f"your {family} tests fail on the CORRECT implementation: {_CORRECT[family]}")


@pytest.mark.gate
@pytest.mark.parametrize("family", list(mutants.MUTANTS))
def test_your_tests_pass_on_the_correct_code(family):
    """Your tests of this function pass on a correct implementation (required for any mutant to count)."""
    _passes_on_correct_code(family)


@pytest.mark.parametrize("family,mutant", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_mutant_is_caught(family, mutant):
    """Your tests fail on this mutant (see the test id: the function and the bug)."""
    _passes_on_correct_code(family)
    impl, what = mutants.MUTANTS[family][mutant]
    caught = mutants.run_student_tests(mutants.student_tests(student_properties, family), impl, family)
    assert caught, f"not caught: {family} with {what}"
