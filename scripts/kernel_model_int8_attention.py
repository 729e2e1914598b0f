"""Command line of perfmodel.int8_attention: ``python scripts/kernel_model_int8_attention.py --help``."""

import sys

from perfmodel.int8_attention import main

if __name__ == "__main__":
    sys.exit(main())
