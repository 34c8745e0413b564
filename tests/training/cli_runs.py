"""Running `fastlm` in a real subprocess (exit codes, signals, stderr), optionally as an unprivileged
user (permission checks mean nothing to root), on files in a world-readable temporary folder."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534


def cli_env():
    # TRITON_INTERPRET=0: the PyTorch reference path on CPU tensors (fast; the kernels are tested elsewhere).
    return {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}


def cli_command(*args, unprivileged=False):
    command = [sys.executable, "-c", "import sys; from fastlm.cli import main; sys.exit(main())", *map(str, args)]
    if unprivileged and os.geteuid() == 0:
        command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
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


def give_to_unprivileged(path: Path) -> None:
    """The folder and its contents owned by the unprivileged user (when the tests run as root)."""
    if os.geteuid() == 0:
        for folder, dirs, files in os.walk(path):
            for name in [folder] + [os.path.join(folder, n) for n in dirs + files]:
                os.chown(name, NOBODY, NOBODY)
