"""Command line of perfmodel.image: ``python scripts/image_model.py --help``."""

import contextlib
import sys

from perfmodel.image import main

if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
