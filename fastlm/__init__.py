"""fastlm: fast, hackable LLM generation.

`import fastlm.kernels` stays light (torch + triton only); the runtime API is imported lazily so that
projects taking only the kernels never pay for (or depend on) the rest.
"""
__version__ = "0.1.0"

_LAZY = {"LLM": "fastlm.runtime.llm", "SamplingParams": "fastlm.runtime.sampling", "Engine": "fastlm.runtime.engine",
         "train": "fastlm.training", "evaluate": "fastlm.training"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastlm' has no attribute {name!r}")
