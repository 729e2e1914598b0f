"""Command line of perfmodel.rope: ``python scripts/kernel_model_rope.py --help``."""

import sys

from perfmodel.rope import main

if __name__ == "__main__":
    sys.exit(main())
