"""Perplexity and QA accuracy of a VLM on an evaluation set.

Greedy exact match is computed by teacher forcing: greedy decoding emits exactly ``target<eos>``
if and only if the arg-max at every target position is the target token, so one batched forward
gives both perplexity and accuracy (``tests/test_eval.py`` checks it against ``generate``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.batching import collate
from ..data.registry import EvalSet
from ..models.processor import Processor
from ..models.vlm import VLM


@dataclass
class ItemScores:
    nll: list[float]  # summed NLL of target tokens (incl. <eos>)
    tokens: list[int]
    content_nll: list[float]  # answer tokens only (no <eos>), QA items
    content_tokens: list[int]
    correct: list[bool]


@torch.no_grad()
def encode_images(model: VLM, processor: Processor, images, batch_size: int = 128) -> torch.Tensor:
    feats = []
    for i in range(0, len(images), batch_size):
        feats.append(model.encode_image(processor.pixels(images[i : i + batch_size])))
    return torch.cat(feats)


@torch.no_grad()
def score_items(
    model: VLM,
    processor: Processor,
    evalset: EvalSet,
    image_features: torch.Tensor,
    image_perm: list[int] | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> ItemScores:
    out = ItemScores([], [], [], [], [])
    items = evalset.items
    bar = tqdm(total=len(items), desc="scoring", disable=not progress, leave=False)
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        enc = [processor.encode(it.prompt, it.target) for it in chunk]
        img = [image_perm[it.image_id] if image_perm else it.image_id for it in chunk]
        batch = collate(enc, img, processor.cfg.pad_token_id)
        logits = model(batch.input_ids, image_features=image_features[batch.image_index])
        logp = F.log_softmax(logits.float(), dim=-1)
        mask = batch.labels != -100
        safe = batch.labels.clamp(min=0)
        tok_nll = -logp.gather(-1, safe[..., None])[..., 0] * mask
        hit = (logits.argmax(-1) == batch.labels) | ~mask
        for j, it in enumerate(chunk):
            n = int(mask[j].sum())
            out.nll.append(float(tok_nll[j].sum()))
            out.tokens.append(n)
            out.correct.append(bool(hit[j].all()))
            if it.is_qa:
                last = int(mask[j].nonzero().max())  # the <eos> prediction
                out.content_nll.append(float(tok_nll[j].sum() - tok_nll[j, last]))
                out.content_tokens.append(n - 1)
        bar.update(len(chunk))
    bar.close()
    return out


def _ppl(nll: list[float], n: list[int]) -> float:
    total = sum(n)
    return math.exp(sum(nll) / total) if total else float("nan")


def mismatch_permutation(n: int, seed: int = 0) -> list[int]:
    """A fixed derangement of image ids (no image keeps its own texts)."""
    if n < 2:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[(perm.index(i) + 1) % n] for i in range(n)]


@torch.no_grad()
def evaluate(
    model: VLM,
    processor: Processor,
    evalset: EvalSet,
    batch_size: int = 256,
    progress: bool = False,
    mismatched: bool = True,
) -> dict:
    model.eval()
    feats = encode_images(model, processor, evalset.images)
    s = score_items(model, processor, evalset, feats, None, batch_size, progress)
    qa = [(it, c) for it, c in zip(evalset.items, s.correct, strict=True) if it.is_qa]
    by_type: dict[str, list[bool]] = defaultdict(list)
    for it, c in qa:
        by_type[it.kind].append(c)
    result = {
        "data": evalset.name,
        "n_examples": len(evalset.items),
        "n_images": len(evalset.images),
        "n_qa": len(qa),
        "perplexity": _ppl(s.nll, s.tokens),
        "perplexity_content": _ppl(s.content_nll, s.content_tokens),
        "qa_accuracy": sum(c for _, c in qa) / len(qa) if qa else float("nan"),
        "qa_accuracy_by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
    }
    novel = [c for it, c in qa if it.novel]
    if novel:
        result["qa_accuracy_novel"] = sum(novel) / len(novel)
    if mismatched:
        perm = mismatch_permutation(len(evalset.images))
        m = score_items(model, processor, evalset, feats, perm, batch_size, progress)
        result["perplexity_mismatched_image"] = _ppl(m.nll, m.tokens)
        result["perplexity_content_mismatched_image"] = _ppl(m.content_nll, m.content_tokens)
    return result
