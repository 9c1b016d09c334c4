"""Distillation data from the user's own images: an ``imagefolder:DIR`` as a training stream.

A real VLM (SmolVLM, LLaVA, Moondream2) should be ternarized on images and texts like the ones it
will see, not on the synthetic shapes world. The folder is the Hugging Face image-folder
convention the evaluator already reads (``metadata.jsonl`` rows with ``file_name`` and ``text``,
or ``question``/``answer``); every row's texts become (prompt, target) pairs, encoded by the
model's own processor (chat template included).
"""

from __future__ import annotations

import random
from collections import defaultdict

import torch
from torch.utils.data import IterableDataset

from ..data.batching import Batch, collate
from ..data.registry import EvalSet
from ..errors import TernvlmError
from ..models.processor import Processor


class FolderStream(IterableDataset):
    """Infinite, step-indexed stream of (pixel batch, token batch), like pretrain.TrainStream:
    batch ``step * world + rank`` draws ``batch_images`` images (with replacement) and
    ``seqs_per_image`` of each image's texts, so data-parallel processes see different images
    and a resumed run sees the same ones."""

    def __init__(
        self,
        processor: Processor,
        cfg,
        data: EvalSet,
        start_step: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.processor, self.cfg, self.data, self.start = processor, cfg, data, start_step
        self.rank, self.world = rank, world
        self.by_image: dict[int, list] = defaultdict(list)
        for item in data.items:
            try:  # every text must fit the context: say which one does not before training
                processor.encode(item.prompt, item.target)
            except TernvlmError as exc:
                name = getattr(data.images[item.image_id], "filename", "") or item.image_id
                raise TernvlmError(f"{data.name}: row of image {name}: {exc}") from None
            self.by_image[item.image_id].append(item)
        self.image_ids = sorted(self.by_image)
        if not self.image_ids:
            raise TernvlmError(f"{data.name} has no texts to train on")

    def batch(self, step: int) -> tuple[torch.Tensor, list[Batch]]:
        c = self.cfg
        rng = random.Random(c.seed * 1_000_003 + step * self.world + self.rank)
        images, encoded, index = [], [], []
        for j in range(c.batch_images):
            image_id = rng.choice(self.image_ids)
            images.append(self.data.images[image_id])
            for _ in range(c.seqs_per_image):
                item = rng.choice(self.by_image[image_id])
                encoded.append(self.processor.encode(item.prompt, item.target))
                index.append(j)
        batch = collate(encoded, index, self.processor.cfg.pad_token_id)
        return self.processor.pixels(images), [batch]

    def __iter__(self):
        step = self.start
        while True:
            yield self.batch(step)
            step += 1
