"""`python -m fastlm.runtime.parallel`: a tensor-parallel rank started by rank 0 (see worker.py)."""
from fastlm.runtime.parallel.worker import exit_now, main

if __name__ == "__main__":
    exit_now(main())
