"""Command line of the Triton kernels' static checks and model (perfmodel.triton_report):
``python scripts/kernel_model_triton.py [--json PATH] [--markdown] [--no-gemv-bytes]``."""

import sys

from perfmodel.triton_report import main

if __name__ == "__main__":
    sys.exit(main())
