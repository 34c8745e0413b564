"""fastlm: a fast, hackable LLM generation engine (Triton kernels + a minimal decoder + KV-cached runtime)."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="fastlm",
    version="0.1.0",
    description="Fast, hackable LLM generation: Triton kernels, GPT-2/Llama checkpoints, KV-cached runtime",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastlm", "fastlm.*"]),
    include_package_data=True,
    package_data={"fastlm": ["default_model/*", "kernels/csrc/*.cpp", "kernels/csrc/*.h"]},
    install_requires=[
        # Ranges, so GPU users keep the torch/triton they have.
        "torch>=2.4,<3",
        "triton>=3.2,<4; sys_platform == 'linux'",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "tqdm>=4.60",
        # fastlm serve
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "prometheus-client>=0.20",
        "jinja2>=3.1",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-xdist>=3",
            "pytest-benchmark>=4",
            "transformers>=4.45",
            "matplotlib>=3.7",
            "openai>=1.30",
        ],
        "bench": ["matplotlib>=3.7", "transformers>=4.45"],
        # benchmarks/bench_llamacpp.py: llama.cpp as the CPU peer (builds from source with CMake)
        "llamacpp": ["llama-cpp-python>=0.3", "gguf>=0.10", "transformers>=4.45", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["fastlm=fastlm.cli:main"]},
)
