"""Fixtures of the runtime tests: tiny checkpoints (GPT-2, Llama GQA) with a tokenizer, and LLMs on them."""
import pytest

from tests.runtime.checkpoints import build_checkpoint

NAMES = ("gpt2", "llama_gqa")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> (folder, transformers model)."""
    built = {}
    for name in NAMES:
        folder = tmp_path_factory.mktemp(name)
        built[name] = (folder, build_checkpoint(name, folder))
    return built


@pytest.fixture(scope="session")
def llms(checkpoints):
    """name -> fastlm.LLM on the checkpoint, fp32."""
    import fastlm

    return {name: fastlm.LLM(str(folder), dtype="float32") for name, (folder, _) in checkpoints.items()}
