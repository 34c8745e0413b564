"""`fastlm serve --tensor-parallel-size 2` with its two ranks started as torchrun starts them (RANK,
WORLD_SIZE, MASTER_ADDR/PORT; gloo, 1 thread each): only rank 0 listens, and it answers what one process
answers; when either rank is killed, the other exits 1 with one line on stderr within --dist-timeout."""
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.serve.server import REPO, Server, tiny_checkpoint

TIMEOUT = 10  # --dist-timeout: a hang fails the test, a slow machine does not
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tp_serve"))


def _rank_env(rank: int, port: int) -> dict:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _start_ranks(folder):
    """(rank 1's process, rank 0's Server) once rank 0 serves."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = ["--model", str(folder), "--dtype", "float32", "--tensor-parallel-size", "2",
             "--dist-timeout", str(TIMEOUT)]
    env = {**Server.environment(), **_rank_env(1, port)}
    rank_1 = subprocess.Popen([sys.executable, "-m", "fastlm", "serve", "--port", "0", *flags], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        return rank_1, Server(*flags, env=_rank_env(0, port))
    except BaseException:
        rank_1.kill()
        raise


@pytest.mark.parametrize("killed", [1, 0])
def test_rank_0_serves_and_a_killed_rank_ends_the_other(folder, killed, monkeypatch):
    import fastlm

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the in-process reference generation: PyTorch path
    expected = fastlm.LLM(str(folder), dtype="float32").generate(PROMPT, max_new_tokens=12, temperature=0)
    rank_1, rank_0 = _start_ranks(folder)
    survivor = rank_0.process if killed == 1 else rank_1
    try:
        reply = rank_0.client().completions.create(model=str(folder), prompt=PROMPT, max_tokens=12, temperature=0)
        assert reply.choices[0].text == expected
        (rank_1 if killed == 1 else rank_0.process).send_signal(signal.SIGKILL)
        start = time.monotonic()
        survivor.wait(TIMEOUT + 30)  # a hang fails here
        elapsed = time.monotonic() - start
    finally:
        for proc in (rank_0.process, rank_1):
            if proc.poll() is None:
                proc.kill()
    err = "".join(rank_0.log) if killed == 1 else rank_1.communicate()[1]
    assert survivor.returncode == 1 and elapsed < TIMEOUT, err[-3000:]
    last = err.strip().splitlines()[-1]
    prefix = "fastlm serve: error: " if killed == 1 else "fastlm: tensor-parallel rank 1: error: "
    assert last.startswith(prefix) and "another rank failed" in last, err[-3000:]
