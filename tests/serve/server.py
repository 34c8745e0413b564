"""A real `python -m fastlm serve` process on a free loopback port (--port 0; the port is read from the
line the server prints when ready), and the checkpoints and templates the server tests use."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.runtime.chat_templates import CHATML

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 180


class Server:
    def __init__(self, *args: str, env: dict = None):
        """env: more environment variables (a torchrun rank's, say)."""
        env = {**self.environment(), **(env or {})}
        self.process = subprocess.Popen([sys.executable, "-m", "fastlm", "serve", "--port", "0", *args], cwd=REPO,
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = self._wait_ready()

    @staticmethod
    def environment() -> dict:
        return {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}

    def _wait_ready(self) -> str:
        deadline, seen = time.monotonic() + STARTUP_TIMEOUT, []
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line and self.process.poll() is not None:
                break
            seen.append(line)
            if " ready on " in line:
                self.log = seen
                threading.Thread(target=self._drain, daemon=True).start()  # a full pipe would block the server
                return line.rsplit(" ", 1)[-1].strip()
        self.process.kill()
        raise RuntimeError("fastlm serve did not start:\n" + "".join(seen))

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.log.append(line)

    def client(self, api_key: str = "none", **options):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, **{"max_retries": 0, "timeout": 120, **options})

    def async_client(self, api_key: str = "none"):
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def metrics(self) -> dict:
        """/metrics as {sample name with labels: value} (comments dropped)."""
        import urllib.request

        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as response:
            text = response.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code (the server drains and exits)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()


def tiny_checkpoint(folder: Path, chat_template: str = None) -> Path:
    """The runtime tests' tiny GPT-2 (byte-level BPE tokenizer), with chat_template in its tokenizer_config."""
    from tests.runtime.checkpoints import build_checkpoint

    build_checkpoint("gpt2", folder)
    if chat_template is not None:
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = chat_template
        config_path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory):
    """Tiny GPT-2 with a ChatML template; a KV pool of 24 blocks of 16 tokens (4 full contexts), so
    concurrent clients queue and get preempted."""
    folder = tiny_checkpoint(tmp_path_factory.mktemp("tiny_gpt2"), CHATML)
    server = Server("--model", str(folder), "--served-model-name", "tiny", "--max-num-seqs", "16",
                    "--max-num-batched-tokens", "64", "--kv-cache-memory", "384K")
    server.tokenizer_folder = folder
    yield server
    assert server.stop() == 0
