"""The grading run's hypothesis profile: `grade` is derandomised (the same examples every run, so two runs
on the same code give the same score), with no deadline (a loaded machine never fails a student) and few
examples (the whole `llama3np check` stays under a minute on 2 cores)."""
from hypothesis import HealthCheck, settings

settings.register_profile(
    "grade", derandomize=True, deadline=None, max_examples=10, database=None, print_blob=False,
    suppress_health_check=list(HealthCheck),
)
settings.load_profile("grade")
