"""Command line of perfmodel.hopper_ws: ``python scripts/kernel_model_hopper_ws.py --help``."""

import sys

from perfmodel.hopper_ws import main

if __name__ == "__main__":
    sys.exit(main())
