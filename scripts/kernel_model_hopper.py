"""Command line of perfmodel.hopper: ``python scripts/kernel_model_hopper.py --help``."""

import sys

from perfmodel.hopper import main

if __name__ == "__main__":
    sys.exit(main())
