"""Command line of perfmodel.prologue: ``python scripts/kernel_model_prologue.py --help``."""

import sys

import torch
from perfmodel.prologue import main

if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
