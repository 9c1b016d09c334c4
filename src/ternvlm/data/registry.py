"""Data set names used on the command line: ``shapes:train|val|test`` or ``imagefolder:PATH``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import TernvlmError
from ..models.processor import CAPTION_PROMPT, qa_prompt
from . import shapes


@dataclass
class Item:
    """One text to score against one image: ``prompt`` is given, ``target`` is predicted."""

    image_id: int
    prompt: str
    target: str
    kind: str  # "caption" or a QA type; QA items count toward accuracy
    novel: bool = False

    @property
    def is_qa(self) -> bool:
        return self.kind != "caption"


@dataclass
class EvalSet:
    name: str
    images: list[Image.Image]
    items: list[Item]


def shapes_eval_set(split: str, limit: int | None = None, image_size: int = 64) -> EvalSet:
    """Every QA pair of each scene plus its first caption phrasing."""
    if split not in shapes.SPLITS:
        raise TernvlmError(f"unknown shapes split {split!r}; expected train, val or test")
    n = limit if limit is not None else shapes.SPLIT_SIZES.get(split, 256)
    if split != "train":
        n = min(n, shapes.SPLIT_SIZES[split])
    images, items = [], []
    for i, s in enumerate(shapes.iter_split(split, n, image_size)):
        images.append(s.image)
        items.append(Item(i, CAPTION_PROMPT, s.captions[0], "caption", s.scene.novel))
        for qa in s.qas:
            items.append(Item(i, qa_prompt(qa.question), qa.answer, qa.kind, s.scene.novel))
    return EvalSet(f"shapes:{split}", images, items)


def load_eval_set(name: str, limit: int | None = None, image_size: int = 64) -> EvalSet:
    kind, _, arg = name.partition(":")
    if kind == "shapes" and arg:
        return shapes_eval_set(arg, limit, image_size)
    if kind == "imagefolder" and arg:
        from .imagefolder import imagefolder_eval_set

        return imagefolder_eval_set(Path(arg), limit)
    raise TernvlmError(
        f"unknown data set {name!r}; expected shapes:train|val|test or imagefolder:PATH"
    )
