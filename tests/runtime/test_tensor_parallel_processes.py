"""Tensor-parallel ranks as real processes (gloo, 1 thread each): `fastlm generate --tensor-parallel-size 2`
(spawned ranks) and the same command under torchrun print the single-process text; a rank that dies
ends the others with an error within the timeout, never a hang, whichever rank it is."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.training.cli_runs import ROOT, cli_command, cli_env

PROMPT = "Once upon a time"
TIMEOUT = 10  # --dist-timeout of the failure tests: a hang fails them, a slow machine does not
GENERATE = ["--temperature", "0", "--max-new-tokens", "16", "--dtype", "float32", "--tensor-parallel-size", "2"]

# rank 0 as a script: starts rank 1, prints its pid, then generates until something fails
RANK_0 = """
import sys, fastlm
llm = fastlm.LLM(sys.argv[1], dtype="float32", tensor_parallel_size=2, threads_per_rank=1, dist_timeout={timeout})
print(llm.parallel.group.workers[0].pid, flush=True)
while True:
    llm.generate_tokens([[5, 6, 7]], max_new_tokens=40, temperature=0, ignore_eos=True)
"""


@pytest.fixture
def llama(llms, checkpoints, reference_kernels):
    return llms["llama_gqa"], str(checkpoints["llama_gqa"][0])


def _env():
    return {**cli_env(), "OMP_NUM_THREADS": "1"}


def test_generate_on_two_spawned_ranks_prints_the_single_process_text(llama):
    llm, folder = llama
    done = subprocess.run(cli_command("generate", PROMPT, "--model", folder, "--threads", "1", *GENERATE),
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr[-3000:]
    assert done.stdout == llm.generate(PROMPT, max_new_tokens=16, temperature=0) + "\n"


def test_generate_under_torchrun_prints_the_single_process_text_once(llama):
    llm, folder = llama
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "fastlm", "generate", PROMPT, "--model", folder, *GENERATE]
    done = subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == llm.generate(PROMPT, max_new_tokens=16, temperature=0) + "\n"  # rank 1 prints nothing


def _start_rank_0(folder):
    """(rank 0's process, rank 1's pid) once rank 1 is up."""
    rank_0 = subprocess.Popen([sys.executable, "-c", RANK_0.format(timeout=TIMEOUT), folder], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = rank_0.stdout.readline()
    assert line.strip().isdigit(), rank_0.communicate(timeout=60)[1][-3000:]
    return rank_0, int(line)


def _gone(pid: int) -> bool:
    """The process ended (a zombie nobody reaped yet counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_killed_rank_1_ends_rank_0_at_once(checkpoints, reference_kernels):
    rank_0, rank_1 = _start_rank_0(str(checkpoints["llama_gqa"][0]))
    try:
        time.sleep(1)  # generating
        os.kill(rank_1, signal.SIGKILL)
        start = time.monotonic()
        _, err = rank_0.communicate(timeout=TIMEOUT + 30)  # a hang fails here
        elapsed = time.monotonic() - start
    finally:
        if rank_0.poll() is None:
            rank_0.kill()
            rank_0.communicate()
    assert rank_0.returncode != 0 and elapsed < TIMEOUT, err[-3000:]
    assert f"RankFailed: tensor-parallel rank 1 (pid {rank_1}) exited with code -9" in err, err[-3000:]


def test_a_killed_rank_0_ends_rank_1_at_once(checkpoints, reference_kernels):
    rank_0, rank_1 = _start_rank_0(str(checkpoints["llama_gqa"][0]))
    try:
        time.sleep(1)
        rank_0.kill()
        start = time.monotonic()
        while not _gone(rank_1) and time.monotonic() - start < TIMEOUT + 30:
            time.sleep(0.1)
        elapsed = time.monotonic() - start
        _, err = rank_0.communicate(timeout=30)  # rank 1 wrote its error to the stderr it inherited
    finally:
        if not _gone(rank_1):
            os.kill(rank_1, signal.SIGKILL)
    assert elapsed < TIMEOUT, err[-3000:]
    assert "fastlm: tensor-parallel rank 1: error: " in err, err[-3000:]
