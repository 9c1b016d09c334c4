"""The procedural shapes world: the embedded data every default-model step trains and tests on.

A scene holds 1 to 4 objects, one per quadrant of the image, each with a shape, a colour, a size,
a small jitter inside its quadrant and sometimes a digit or short word written on it. Everything is
a pure function of ``(split, index)``, so the world needs no files and is identical on every machine.

The ``test`` split also contains scenes with (colour, shape) pairs that ``train`` and ``val`` never
show (``HELD_OUT``), to measure compositional generalisation; ``Scene.novel`` marks them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (240, 215, 40),
    "purple": (145, 55, 195),
    "orange": (245, 135, 30),
}
BACKGROUNDS = {"black": (12, 12, 12), "white": (245, 245, 245), "gray": (125, 125, 125)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "large")
TEXTS = tuple("0123456789") + ("up", "go", "no", "ok")
NUMBERS = ("zero", "one", "two", "three", "four")
HELD_OUT = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("yellow", "square"), ("green", "diamond")}
)

SPLITS = {"train": 0, "val": 1, "test": 2}
SPLIT_SIZES = {"val": 256, "test": 512}
NOVEL_FRACTION = 0.3  # share of test scenes forced to hold a held-out (colour, shape) pair
TEXT_PROB = 0.5  # chance that a large object carries text
QA_TYPES = ("count", "background", "colour", "shape", "position", "size", "text")

_SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str
    dx: float  # jitter of the centre, as a fraction of the quadrant size, in [-1, 1]
    dy: float
    text: str | None = None


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]
    split: str = "train"
    index: int = 0
    novel: bool = False

    def key(self) -> tuple:
        """Canonical content key (ignores split/index): two scenes with one key look the same."""
        objs = tuple(
            sorted(
                (o.position, o.shape, o.colour, o.size, round(o.dx, 3), round(o.dy, 3), o.text)
                for o in self.objects
            )
        )
        return (self.background, objs)


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str


@dataclass
class Sample:
    """One scene with its rendered image, caption phrasings and question/answer pairs."""

    scene: Scene
    image: Image.Image
    captions: list[str]
    qas: list[QA] = field(default_factory=list)


# --------------------------------------------------------------------------- scene sampling


def _rng(split: str, index: int, salt: int = 0) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return np.random.default_rng([SPLITS[split], int(index), salt, 20261124])


def _sample_object(
    rng: np.random.Generator, position: str, allow_held_out: bool, force: tuple | None
) -> SceneObject:
    while True:
        if force is not None:
            colour, shape = force
        else:
            colour = str(rng.choice(list(COLOURS)))
            shape = str(rng.choice(SHAPES))
        if allow_held_out or (colour, shape) not in HELD_OUT:
            break
    size = str(rng.choice(SIZES))
    text = None
    if size == "large" and rng.random() < TEXT_PROB:
        text = str(rng.choice(TEXTS))
    dx, dy = (float(v) for v in rng.uniform(-1.0, 1.0, size=2).round(3))
    return SceneObject(shape, colour, size, position, dx, dy, text)


def sample_scene(split: str, index: int) -> Scene:
    """Scene ``index`` of ``split``; train/val never contain HELD_OUT pairs."""
    rng = _rng(split, index)
    n = int(rng.integers(1, 5))
    positions = [POSITIONS[i] for i in sorted(rng.choice(4, size=n, replace=False))]
    background = str(rng.choice(list(BACKGROUNDS)))
    novel = split == "test" and rng.random() < NOVEL_FRACTION
    forced_slot = int(rng.integers(n)) if novel else -1
    held = sorted(HELD_OUT)
    objects = []
    for i, pos in enumerate(positions):
        force = held[int(rng.integers(len(held)))] if i == forced_slot else None
        objects.append(_sample_object(rng, pos, allow_held_out=force is not None, force=force))
    return Scene(background, tuple(objects), split, index, novel)


@functools.lru_cache(maxsize=4)
def _eval_keys() -> frozenset:
    keys = set()
    for split in ("val", "test"):
        for i in range(SPLIT_SIZES[split]):
            keys.add(sample_scene(split, i).key())
    return frozenset(keys)


def train_scene(index: int) -> Scene:
    """Training scene ``index``, skipping any that equals a val/test scene (disjoint splits)."""
    salt = 0
    while True:
        scene = sample_scene("train", index) if salt == 0 else _resample("train", index, salt)
        if scene.key() not in _eval_keys():
            return scene
        salt += 1


def _resample(split: str, index: int, salt: int) -> Scene:
    # Reuse sample_scene's logic on a salted index stream far outside the normal range.
    return sample_scene(split, index + salt * (1 << 40))


def scene_for(split: str, index: int) -> Scene:
    if split == "train":
        return train_scene(index)
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    if index < 0 or index >= SPLIT_SIZES[split]:
        raise IndexError(f"{split} has {SPLIT_SIZES[split]} scenes; index {index} is out of range")
    return sample_scene(split, index)


# --------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=px)


def _text_colour(colour: str) -> tuple[int, int, int]:
    r, g, b = COLOURS[colour]
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw the scene as an RGB image of ``size`` x ``size`` (supersampled, then downscaled)."""
    s = size * _SUPERSAMPLE
    img = Image.new("RGB", (s, s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cell = s / 2
    for o in scene.objects:
        col = POSITIONS.index(o.position) % 2
        row = POSITIONS.index(o.position) // 2
        half = cell * (0.36 if o.size == "large" else 0.21)
        slack = cell / 2 - half - cell * 0.04
        cx = (col + 0.5) * cell + o.dx * slack
        cy = (row + 0.5) * cell + o.dy * slack
        fill = COLOURS[o.colour]
        box = (cx - half, cy - half, cx + half, cy + half)
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(
                (cx - 0.85 * half, cy - 0.85 * half, cx + 0.85 * half, cy + 0.85 * half), fill=fill
            )
        elif o.shape == "triangle":
            draw.polygon(
                [(cx, cy - half), (cx + half, cy + 0.8 * half), (cx - half, cy + 0.8 * half)],
                fill=fill,
            )
        elif o.shape == "diamond":
            draw.polygon(
                [(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=fill
            )
        if o.text:
            font = _font(int(cell * 0.36))
            ty = cy + (0.25 * half if o.shape == "triangle" else 0.0)
            draw.text((cx, ty), o.text, fill=_text_colour(o.colour), font=font, anchor="mm")
    return img.resize((size, size), Image.Resampling.LANCZOS)


# --------------------------------------------------------------------------- language


def _object_phrase(o: SceneObject, style: int) -> str:
    core = f"{o.colour} {o.shape}" if style % 2 == 0 else f"{o.size} {o.colour} {o.shape}"
    where = f"at the {o.position}" if style < 2 else f"in the {o.position}"
    phrase = f"a {core} {where}"
    if o.text:
        kind = "number" if o.text.isdigit() else "word"
        phrase += f" with the {kind} {o.text}" if style % 2 == 0 else f" marked {o.text}"
    return phrase


def captions(scene: Scene) -> list[str]:
    """All phrasings of the scene's caption (the objects always in reading order)."""
    out = []
    n = len(scene.objects)
    for style in range(4):
        parts = [_object_phrase(o, style) for o in scene.objects]
        listing = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        if style == 0:
            out.append(f"{listing} on a {scene.background} background")
        elif style == 1:
            noun = "shape" if n == 1 else "shapes"
            out.append(f"{NUMBERS[n]} {noun} on {scene.background}: {listing}")
        elif style == 2:
            out.append(f"a {scene.background} picture with {listing}")
        else:
            out.append(f"{listing}, background {scene.background}")
    return out


def _unique(objs: tuple[SceneObject, ...], pred) -> bool:
    return sum(1 for o in objs if pred(o)) == 1


def questions(scene: Scene) -> list[QA]:
    """Every unambiguous question about the scene, with its one-word or two-word answer."""
    objs = scene.objects
    n = len(objs)
    qas = [
        QA("how many shapes are there?", NUMBERS[n], "count"),
        QA("what colour is the background?", scene.background, "background"),
    ]
    for o in objs:
        if _unique(objs, lambda p, o=o: p.shape == o.shape):
            qas.append(QA(f"what colour is the {o.shape}?", o.colour, "colour"))
        else:
            qas.append(QA(f"what colour is the shape at the {o.position}?", o.colour, "colour"))
        qas.append(QA(f"what shape is at the {o.position}?", o.shape, "shape"))
        if _unique(objs, lambda p, o=o: (p.colour, p.shape) == (o.colour, o.shape)):
            qas.append(QA(f"where is the {o.colour} {o.shape}?", o.position, "position"))
        qas.append(QA(f"what size is the shape at the {o.position}?", o.size, "size"))
        if o.size == "large":
            qas.append(QA(f"what is written at the {o.position}?", o.text or "nothing", "text"))
    return qas


def make_sample(split: str, index: int, image_size: int = 64) -> Sample:
    scene = scene_for(split, index)
    return Sample(scene, render(scene, image_size), captions(scene), questions(scene))


def iter_split(split: str, n: int | None = None, image_size: int = 64) -> Iterator[Sample]:
    """Samples of a fixed split (val/test: all of them unless ``n``; train: needs ``n``)."""
    if split == "train" and n is None:
        raise ValueError("the train split is unbounded: pass n")
    total = SPLIT_SIZES.get(split, n) if n is None else n
    for i in range(total):
        yield make_sample(split, i, image_size)


def vocabulary_text() -> Iterator[str]:
    """Text covering every word the world can say, for tokenizer training."""
    for i in range(3000):
        scene = train_scene(i)
        yield from captions(scene)
        for qa in questions(scene):
            yield f"question: {qa.question} answer: {qa.answer}"
    words = list(SHAPES) + list(COLOURS) + list(BACKGROUNDS) + list(POSITIONS) + list(SIZES)
    words += list(TEXTS) + list(NUMBERS) + ["nothing", "caption:"]
    yield " ".join(words)
