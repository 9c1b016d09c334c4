"""User data in the Hugging Face image-folder convention: a folder with ``metadata.jsonl``.

Each line is a JSON object with ``file_name`` (relative to the folder) and ``text`` (a caption).
Optional ``question``/``answer`` fields make the row a QA item scored for accuracy as well.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import TernvlmError
from ..models.processor import CAPTION_PROMPT, qa_prompt
from .images import load_image
from .registry import EvalSet, Item


def read_metadata(folder: Path) -> list[dict]:
    meta = folder / "metadata.jsonl"
    if not folder.is_dir():
        raise TernvlmError(f"image folder not found: {folder}")
    if not meta.exists():
        raise TernvlmError(f"image folder has no metadata.jsonl: {folder}")
    rows = []
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TernvlmError(f"{meta}:{n}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise TernvlmError(f"{meta}:{n}: each row needs a file_name")
        if "text" not in row and not ("question" in row and "answer" in row):
            raise TernvlmError(f"{meta}:{n}: each row needs text, or question and answer")
        rows.append(row)
    if not rows:
        raise TernvlmError(f"{meta} has no rows")
    return rows


def imagefolder_eval_set(folder: Path, limit: int | None = None) -> EvalSet:
    rows = read_metadata(folder)[:limit]
    images, items = [], []
    for i, row in enumerate(rows):
        images.append(load_image(folder / row["file_name"]))
        if "text" in row:
            items.append(Item(i, CAPTION_PROMPT, str(row["text"]), "caption"))
        if "question" in row and "answer" in row:
            items.append(Item(i, qa_prompt(str(row["question"])), str(row["answer"]), "qa"))
    return EvalSet(f"imagefolder:{folder}", images, items)
