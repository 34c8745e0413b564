"""fastlm.kernels stands alone: importing it pulls in neither transformers nor the rest of fastlm."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHECK = """
import sys
import fastlm.kernels
import fastlm.kernels.patch
fastlm.kernels.patch  # the function is exported
leaked = [m for m in ("transformers", "fastlm.model", "fastlm.runtime", "fastlm.training") if m in sys.modules]
assert not leaked, leaked
"""


def test_import_fastlm_kernels_imports_no_transformers_nor_rest_of_fastlm():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
