"""`fastlm generate` as a real process (issue 11, items 9 and 10): a closed pipe, a full disk, Ctrl-C
during startup and a seed out of range give at most one line on stderr and no traceback."""
import subprocess
import sys

import pytest

import fastlm.runtime.sampling
from tests.training.cli_runs import cli_command, cli_env


def generate_args(checkpoints, *extra):
    return ["generate", "Once upon a time", "--model", checkpoints["gpt2"][0], "--device", "cpu",
            "--temperature", "0", *extra]


def test_a_plain_run_exits_0_with_nothing_on_stderr(checkpoints):
    """The README's main job: the engine's loop thread, when still tearing itself down as the
    interpreter finalized, made most runs abort at exit (SIGABRT, "terminate called without an active
    exception") after printing their text. The race is timing-dependent: three runs."""
    for _ in range(3):
        result = subprocess.run(cli_command(*generate_args(checkpoints, "--max-new-tokens", "8")), env=cli_env(),
                                capture_output=True, text=True, timeout=300)
        assert result.stdout.strip()  # the generated text
        assert (result.returncode, result.stderr) == (0, "")


def test_closed_output_pipe_exits_quietly(checkpoints):
    command = " ".join(f"'{a}'" for a in cli_command(*generate_args(checkpoints, "--max-new-tokens", "80")))
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {command} | head -c 20"], env=cli_env(),
                            capture_output=True, timeout=300)
    assert len(result.stdout) == 20
    assert result.stderr == b"" and result.returncode == 141  # 128 + SIGPIPE, like other Unix tools


def test_full_disk_is_one_line(checkpoints):
    with open("/dev/full", "w") as full:
        result = subprocess.run(cli_command(*generate_args(checkpoints, "--max-new-tokens", "40")), env=cli_env(),
                                stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr == "fastlm: error: No space left on device\n"


def test_ctrl_c_during_startup_exits_130(checkpoints):
    """The KeyboardInterrupt arrives while torch is being imported, before any subcommand runs."""
    code = ("import builtins, sys\n"
            "real = builtins.__import__\n"
            "def interrupted(name, *args, **kwargs):\n"
            "    if name == 'torch':\n"
            "        raise KeyboardInterrupt\n"
            "    return real(name, *args, **kwargs)\n"
            "builtins.__import__ = interrupted\n"
            "from fastlm.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    argv = [str(a) for a in generate_args(checkpoints)]
    result = subprocess.run([sys.executable, "-c", code, *argv], env=cli_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 130 and result.stderr == ""


@pytest.mark.parametrize("seed", ["1180591620717411303424", "18446744073709551616"])
def test_seed_out_of_range_is_one_line_before_loading(tmp_path, seed):
    result = subprocess.run(cli_command("generate", "hi", "--model", tmp_path / "not_loaded", "--seed", seed),
                            env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("fastlm generate: error: seed must be in [0, 18446744073709551615]")


def test_largest_seed_works(llms, reference_kernels):
    assert isinstance(llms["gpt2"].generate("hi", max_new_tokens=3, seed=2 ** 64 - 1), str)


@pytest.mark.parametrize("stop", [5, 2.5, object()])
def test_stop_that_is_not_text_is_a_value_error(llms, stop):
    with pytest.raises(ValueError, match="stop must be a string or a list of non-empty strings"):
        llms["gpt2"].generate("hi", max_new_tokens=2, stop=stop)
    with pytest.raises(ValueError, match="stop must be"):
        fastlm.runtime.sampling.SamplingParams(stop=stop)
