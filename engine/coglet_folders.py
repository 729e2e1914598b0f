"""coglet's per-prediction folders, removed by the predictor since coglet 0.23.1 never does.

coglet 0.23.1 (the Cog HTTP server, crates/coglet/src/service.rs, ``PredictionService::predict``)
creates ``/tmp/coglet/predictions/<prediction id>/{inputs,outputs}`` for every prediction, a
fixed path (``TMPDIR`` is not read), and never removes it: a server that runs for weeks fills
its disk with empty folders (and spilled inputs: an input over the IPC frame limit, such as a
large ``data:`` LoRA, is written to ``inputs/``). docs/architecture.md has the upstream report.

What is safe to remove, and when: coglet creates a prediction's folder when it admits the
prediction, before the worker (this process) sees the request; the worker reads a spilled
input before ``predict()`` is called; the outputs folder is used only for outputs too large for
one IPC frame, which ours (a list of file paths) never are. At most ``COG_MAX_CONCURRENCY``
predictions are admitted at a time, and their folders are the newest. So at the start of each
``predict()`` every folder but the ``keep`` newest is a finished prediction's, and goes.
Only folders owned by this process's user are touched; nothing outside ``root`` ever is.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path("/tmp/coglet/predictions")  # coglet 0.23.1's fixed path (service.rs)


def prune(root: Path = ROOT, keep: int = 2) -> int:
    """Remove all but the ``keep`` newest prediction folders under ``root``; returns how many went.

    ``keep`` is the number of predictions the server admits at once (COG_MAX_CONCURRENCY):
    their folders are the newest, and are left alone.
    """
    try:
        entries = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return 0
    mine = []
    for e in entries:
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if st.st_uid == os.getuid():
            mine.append((st.st_mtime_ns, e.path))
    mine.sort()
    removed = 0
    for _, path in mine[: max(0, len(mine) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    if removed:
        logger.info("removed %d finished prediction folder(s) left by coglet under %s", removed, root)
    return removed
