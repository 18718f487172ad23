"""Classroom exercises: the package's own code with holes, a grader with hints, a student version.

    from llama3np.exercises import check, require
    check("ex05b")            # grade one exercise in a notebook: the table, hint 1 on a failure
    require("ex02", "ex03")   # stop a cell early, naming the exercises to finish first

Rooms: catalogue (the list of exercises), regions (the BEGIN/END SOLUTION markers and the stubs),
grader (pytest underneath, points, JSON, JUnit), student (the student version and its inverted
validation), fixtures (reference .npz files from the solutions), mutants (student-written property
tests graded against buggy implementations), heatmap (the gradient-error picture), cli.
"""
from .catalogue import EXERCISES
from .grader import ExercisesNotDone, check, require

__all__ = ["EXERCISES", "check", "require", "ExercisesNotDone"]
