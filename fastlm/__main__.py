"""`python -m fastlm ...` (and `torchrun ... -m fastlm train ...`): the `fastlm` command."""
import sys

from fastlm.cli import main

if __name__ == "__main__":
    sys.exit(main())
