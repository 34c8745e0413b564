"""Which checkpoint folder to load: the one the user names, or the embedded default model shipped
inside the package (fastlm/default_model/). One rule and one error type (ValueError, which the command
line prints as one line) for the runtime, evaluation and training."""
from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"


def resolve_model_path(model) -> Path:
    """`model` (a checkpoint folder: str or Path) or, when None, the embedded default model."""
    if model is None:
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise ValueError("no embedded default model in this installation (fastlm/default_model/ is missing); "
                             "pass a checkpoint path, e.g. LLM('path/to/checkpoint') or --model PATH")
        return DEFAULT_MODEL_DIR
    if not isinstance(model, (str, Path)):
        raise ValueError(f"model must be a checkpoint folder path, got {type(model).__name__}")
    path = Path(model)
    if not path.exists():
        raise ValueError(f"model path does not exist: {model}")
    if not (path / "config.json").is_file():
        raise ValueError(f"model path {model} is not a checkpoint folder (no config.json in it)")
    return path
