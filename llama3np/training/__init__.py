"""Pre-training: the loop (`train.py`) and its run folder of checkpoints (`checkpoint.py`).

    from llama3np.training import TrainConfig, train, load_run
    model = train(TrainConfig(out="runs/tiny", preset="tiny", steps=300))
    model = load_run("runs/tiny")          # the latest good checkpoint, tokenizer included
"""
from .run_folder import load_run
from .loop import TrainConfig, TrainingError, train

__all__ = ["TrainConfig", "TrainingError", "train", "load_run"]
