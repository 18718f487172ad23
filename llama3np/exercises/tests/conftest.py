"""The grading run's hypothesis profile `grade`: derandomised (the same examples every run, so two runs on
the same code give the same score), no deadline (a loaded machine never fails a student), few examples
and no shrinking (the whole `llama3np check` stays under a minute on 2 cores; a stub's NotImplementedError
is not worth minimising), and nothing written to disk (no example database, no patch files)."""
from hypothesis import HealthCheck, Phase, settings

settings.register_profile(
    "grade", derandomize=True, deadline=None, max_examples=10, database=None, print_blob=False,
    phases=(Phase.explicit, Phase.reuse, Phase.generate), suppress_health_check=list(HealthCheck),
)
settings.load_profile("grade")
