"""Training and evaluation on text files: `fastlm.train(...)`, `fastlm.evaluate(...)`, and the
`fastlm train` / `fastlm eval` commands (fastlm.training.commands)."""
from fastlm.training.evaluation import DEFAULT_MODEL_DIR, evaluate
from fastlm.training.trainer import TrainResult, train

__all__ = ["train", "evaluate", "TrainResult", "DEFAULT_MODEL_DIR"]
