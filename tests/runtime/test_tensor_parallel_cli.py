"""`--tensor-parallel-size` on `fastlm generate`, `bench` and `serve`: bad values are one stderr line and
exit code 2 before any rank starts; `fastlm bench --tensor-parallel-size 2` reports the configuration
(ranks x threads) and the whole model's weight bytes, and its rank 1 ends with the command."""
import re

import pytest
import torch

from tests.runtime.test_cli_options import read_bytes_per_step
from tests.runtime.test_errors import run_cli

COMMANDS = {"generate": ["generate", "hi", "--max-new-tokens", "2"], "bench": ["bench", "--repeats", "1"],
            "serve": ["serve", "--port", "0"]}


@pytest.fixture(autouse=True)
def restore_threads():
    """Rank 0 is this process: LLM(..., threads_per_rank=1) sets its torch threads."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("flags, message", [
    (["--tensor-parallel-size", "0"], "tensor_parallel_size must be >= 1, got 0"),
    (["--tensor-parallel-size", "3"], "tensor_parallel_size (3) must divide the model's 4 attention heads"),
    (["--tensor-parallel-size", "2", "--dist-timeout", "0"], "dist_timeout must be > 0, got 0.0"),
    (["--tensor-parallel-size", "2", "--threads", "0"], "threads must be >= 1, got 0"),
    (["--tensor-parallel-size", "2", "--quantize", "int8"], "--quantize is not available with --tensor-parallel-size > 1"),
    (["--tensor-parallel-size", "2", "--device", "cpu:1"], "device must be 'cpu' or 'cuda'"),
])
def test_bad_values_are_one_line_before_any_rank_starts(checkpoints, capsys, command, flags, message):
    code, out, err = run_cli(capsys, *COMMANDS[command], "--model", str(checkpoints["gpt2"][0]), *flags)
    assert (code, out) == (2, "") and err.count("\n") == 1, err
    assert err.startswith(f"fastlm {command}: error: ") and message in err
    assert not torch.distributed.is_initialized()


def test_bench_on_two_ranks_reports_its_configuration(checkpoints, reference_kernels, capsys):
    folder = checkpoints["llama_gqa"][0]
    code, out, err = run_cli(capsys, "bench", "--model", str(folder), "--dtype", "float32", "--device", "cpu",
                             "--tensor-parallel-size", "2", "--threads", "1", "--batch-size", "1", "2",
                             "--prompt-len", "5", "--new-tokens", "3", "--repeats", "1")
    assert (code, err) == (0, ""), err
    header, _, *rows = out.strip().splitlines()
    assert header.endswith("; 2 ranks (tensor-parallel) x 1 CPU threads")
    weight_gb = float(re.search(r"weights (\S+) GB per step", header).group(1))
    assert weight_gb == pytest.approx(read_bytes_per_step(folder, 4) / 1e9, rel=5e-4)  # the whole model's
    assert [int(row.split()[0]) for row in rows] == [1, 2] and all(float(row.split()[2]) > 0 for row in rows)
    assert not torch.distributed.is_initialized()  # the command closed its ranks
