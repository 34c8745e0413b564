"""Running `fastlm` in a real subprocess (exit codes, signals, stderr), optionally without privileges
(permission checks mean nothing to root with its capabilities), on files in a temporary folder."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli_env():
    # TRITON_INTERPRET=0: the PyTorch reference path on CPU tensors (fast; the kernels are tested elsewhere).
    return {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}


def cli_command(*args, unprivileged=False):
    command = [sys.executable, "-c", "import sys; from fastlm.cli import main; sys.exit(main())", *map(str, args)]
    if unprivileged and os.geteuid() == 0:
        # root without any capability (no CAP_DAC_OVERRIDE): file permissions apply to it as to anyone,
        # while the interpreter and its packages (often under /root) stay readable, unlike for `nobody`
        command = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", *command]
    return command


def run_cli(*args, unprivileged=False, **kwargs):
    return subprocess.run(cli_command(*args, unprivileged=unprivileged), env=cli_env(), capture_output=True,
                          text=True, timeout=300, **kwargs)


class SharedFolder:
    """A temporary folder everyone can read (pytest's tmp folders are private to their owner)."""

    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix="fastlm-test-"))
        self.path.chmod(0o755)
        return self.path

    def __exit__(self, *exc):
        for folder, dirs, _ in os.walk(self.path):
            for d in dirs:
                os.chmod(os.path.join(folder, d), 0o755)
        shutil.rmtree(self.path)
