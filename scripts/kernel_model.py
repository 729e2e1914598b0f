"""Command line of the CUDA kernels' static model (perfmodel.cuda): ``python scripts/kernel_model.py
[--arch 86] [--markdown docs/benchmarks.md] [--json out.json]``."""

import sys

from perfmodel.cuda import main

if __name__ == "__main__":
    sys.exit(main())
