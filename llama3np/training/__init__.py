"""Pre-training: its configuration, the loop, the rules of a step, and the run folder of checkpoints.

    config.py      TrainConfig and its command-line arguments (defined once, for train and parallel train)
    loop.py        the single-process loop: start_run (fresh or resumed) -> steps -> Run.save
    step.py        RunState and what happens once a step's loss and gradient are known (both loops)
    run_folder.py  checkpoints that survive a kill; save_run / restore_run / trim_log; load_run

    from llama3np.training import TrainConfig, train, resume_config, load_run
    model = train(TrainConfig(out="runs/tiny", preset="tiny", steps=300))
    model = train(resume_config("runs/tiny", steps=400))   # continue it to step 400
    model = load_run("runs/tiny")          # the latest good checkpoint, tokenizer included
"""
from .config import TrainConfig, resume_config
from .loop import Run, TrainingError, start_run, train
from .run_folder import Restored, load_run, restore_run, save_run
from .step import RunState

__all__ = ["TrainConfig", "TrainingError", "train", "resume_config", "start_run", "Run", "RunState", "save_run",
           "restore_run", "Restored", "load_run"]
