"""Writing the models' tables: Markdown table heads and generated blocks inside a Markdown file."""

from __future__ import annotations

from pathlib import Path


def table_head(*columns: str) -> list[str]:
    """The header row and the separator row of a Markdown table."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def write_markdown(path: Path, block: str, begin: str, end: str, heading: str) -> None:
    """Replace the block between ``begin`` and ``end`` in ``path`` (``block`` holds both markers),
    or append it under ``heading`` when the file has none."""
    text = path.read_text() if path.exists() else ""
    if begin in text:
        a, b = text.index(begin), text.index(end) + len(end)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip() + f"\n\n{heading}\n\n{block}\n"
    path.write_text(text)
