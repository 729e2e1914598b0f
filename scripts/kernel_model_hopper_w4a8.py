"""Command line of perfmodel.hopper_w4a8: ``python scripts/kernel_model_hopper_w4a8.py --help``."""

import sys

from perfmodel.hopper_w4a8 import main

if __name__ == "__main__":
    sys.exit(main())
