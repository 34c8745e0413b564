"""`python -m fastlm ...`: the same as the `fastlm` command."""
import sys

from fastlm.cli import main

sys.exit(main())
