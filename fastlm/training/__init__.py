"""Training and evaluation on text files: `fastlm.train(...)`, `fastlm.evaluate(...)`, and the
`fastlm train` / `fastlm eval` commands (fastlm.training.commands)."""
from fastlm.model.model_path import DEFAULT_MODEL_DIR
from fastlm.training.evaluation import evaluate
from fastlm.training.interrupts import TrainingDiverged, TrainingInterrupted
from fastlm.training.trainer import TrainResult, train

__all__ = ["train", "evaluate", "TrainResult", "TrainingDiverged", "TrainingInterrupted", "DEFAULT_MODEL_DIR"]
