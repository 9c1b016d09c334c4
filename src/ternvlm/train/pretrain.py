"""Pre-training of the default VLM from scratch on the shapes world (CPU, minutes to an hour).

Each step draws ``batch_images`` scenes (deterministic by step, so a resumed run sees the same
data), encodes each image once and trains ``seqs_per_image`` independent sequences on it
(captions and QA pairs): the image encoder's cost is shared by several supervised texts.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from ..config import DecoderConfig, VisionConfig, VLMConfig
from ..data import shapes
from ..data.batching import Batch, collate
from ..data.registry import shapes_eval_set
from ..eval.evaluate import evaluate
from ..eval.plots import plot_pretrain_log
from ..models.checkpoint import WEIGHTS, load_weights, save_checkpoint
from ..models.processor import CAPTION_PROMPT, Processor, qa_prompt
from ..models.tokenizer import train_tokenizer
from ..models.vlm import VLM


@dataclass
class PretrainConfig:
    steps: int = 4000
    batch_images: int = 32
    seqs_per_image: int = 4
    caption_prob: float = 0.15
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 200
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 250
    val_scenes: int = 128
    test_scenes: int | None = None  # final evaluation on shapes:test (None: all of it)
    threads: int = 2
    data_workers: int = 1
    model: VLMConfig = field(default_factory=VLMConfig)


def default_model_config(vocab_size: int) -> VLMConfig:
    return VLMConfig(
        vision=VisionConfig(
            image_size=64, patch_size=8, stem="conv", hidden=128, layers=4, heads=4, mlp=512
        ),
        decoder=DecoderConfig(
            vocab_size=vocab_size, hidden=192, layers=4, heads=6, kv_heads=2, mlp=512
        ),
    ).validate()


class TrainStream(IterableDataset):
    """Infinite, step-indexed stream of (pixel batch, token batch).

    ``cfg`` needs ``seed``, ``batch_images``, ``seqs_per_image`` and ``caption_prob``. With
    ``world`` data-parallel processes, process ``rank`` draws batch ``step * world + rank``: every
    process sees different scenes and a resumed run sees the same ones.
    """

    def __init__(
        self, processor: Processor, cfg, start_step: int, rank: int = 0, world: int = 1
    ) -> None:
        self.processor, self.cfg, self.start = processor, cfg, start_step
        self.rank, self.world = rank, world

    def batch(self, step: int) -> tuple[torch.Tensor, list[Batch]]:
        c = self.cfg
        b = step * self.world + self.rank
        rng = random.Random(c.seed * 1_000_003 + b)
        images, qa_enc, qa_img, cap_enc, cap_img = [], [], [], [], []
        for j in range(c.batch_images):
            s = shapes.make_sample(
                "train", b * c.batch_images + j, self.processor.cfg.vision.image_size
            )
            images.append(s.image)
            for _ in range(c.seqs_per_image):
                if rng.random() < c.caption_prob:
                    cap_enc.append(self.processor.encode(CAPTION_PROMPT, rng.choice(s.captions)))
                    cap_img.append(j)
                else:
                    qa = rng.choice(s.qas)
                    qa_enc.append(self.processor.encode(qa_prompt(qa.question), qa.answer))
                    qa_img.append(j)
        # Short QA sequences and long captions go in separate batches: far less padding.
        pad = self.processor.cfg.pad_token_id
        batches = [collate(e, i, pad) for e, i in ((qa_enc, qa_img), (cap_enc, cap_img)) if e]
        return self.processor.pixels(images), batches

    def __iter__(self):
        step = self.start
        while True:
            yield self.batch(step)
            step += 1


def lr_at(step: int, c: PretrainConfig) -> float:
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    t = (step - c.warmup) / max(1, c.steps - c.warmup)
    return c.lr * (
        c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    )


def make_optimizer(model: VLM, c: PretrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    groups = [
        {"params": decay, "weight_decay": c.weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=c.lr, betas=(0.9, 0.95))


def loss_fn(model: VLM, pixels: torch.Tensor, batches: list[Batch]) -> torch.Tensor:
    """Mean token cross-entropy over all target tokens of all sub-batches."""
    feats = model.encode_image(pixels)
    total, count = 0.0, 0
    for b in batches:
        logits = model(b.input_ids, image_features=feats[b.image_index])
        total = total + F.cross_entropy(
            logits.flatten(0, 1), b.labels.flatten(), ignore_index=-100, reduction="sum"
        )
        count += int((b.labels != -100).sum())
    return total / max(count, 1)


def model_card(c: PretrainConfig, metrics: dict, seconds: float, command: str) -> str:
    m = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    return (
        "# ternvlm default model\n\n"
        "A small Idefics3-family VLM (SigLIP-style ViT, pixel-shuffle connector, llama decoder) "
        "pre-trained from scratch on the procedural shapes world, as the stand-in for a pre-trained "
        "VLM in ternvlm's demo and tests.\n\n"
        f"- command: `{command}`\n- seed: {c.seed}\n- steps: {c.steps} "
        f"({c.batch_images} images x {c.seqs_per_image} sequences per step)\n"
        f"- wall time: {seconds / 60:.1f} min, {c.threads} CPU threads\n"
        f"- parameters: see config.json\n\n## Final metrics on shapes:test\n\n```json\n"
        f"{json.dumps(m, indent=2)}\n```\n\nPer QA type: `{json.dumps(metrics.get('qa_accuracy_by_type', {}))}`\n\n"
        f"## Training config\n\n```json\n{json.dumps({k: v for k, v in asdict(c).items() if k != 'model'}, indent=2)}\n```\n"
    )


def pretrain(out: str | Path, c: PretrainConfig, resume: bool = True, command: str = "") -> dict:
    """Train, validate every ``eval_every`` steps, checkpoint atomically to ``out/checkpoint``."""
    out = Path(out)
    torch.set_num_threads(c.threads)
    torch.manual_seed(c.seed)
    ckpt = out / "checkpoint"
    start = 0
    tok = train_tokenizer(shapes.vocabulary_text(), vocab_size=c.model.decoder.vocab_size)
    c.model.decoder.vocab_size = tok.get_vocab_size()
    model = VLM(c.model)
    opt = make_optimizer(model, c)
    if resume and (ckpt / "train_state.pt").exists():
        from safetensors.torch import load_file

        state = torch.load(ckpt / "train_state.pt", weights_only=False)
        load_weights(model, load_file(str(ckpt / WEIGHTS)), str(ckpt))
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = int(state["step"])
        print(f"resuming from step {start}")
    proc = Processor(model.cfg, tok)
    val = shapes_eval_set("val", c.val_scenes, c.model.vision.image_size)
    log_path = out / "log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    loader = DataLoader(
        TrainStream(proc, c, start),
        batch_size=None,
        num_workers=c.data_workers,
        prefetch_factor=4 if c.data_workers else None,
    )
    t0 = time.time()
    bar = tqdm(total=c.steps, initial=start, desc="pretrain", dynamic_ncols=True)
    ema = None
    model.train()
    it = iter(loader)
    for step in range(start, c.steps):
        pixels, batches = next(it)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, c)
        loss = loss_fn(model, pixels, batches)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}")
        done = step + 1
        if done % c.eval_every == 0 or done == c.steps:
            metrics = evaluate(model, proc, val, mismatched=False)
            model.train()
            rec = {
                "step": done,
                "loss": ema,
                "lr": lr_at(step, c),
                "seconds": time.time() - t0,
                **metrics,
            }
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.write(
                f"step {done}: loss {ema:.3f} val ppl {metrics['perplexity']:.3f} acc {metrics['qa_accuracy']:.3f} "
                + " ".join(f"{k}={v:.2f}" for k, v in metrics["qa_accuracy_by_type"].items())
            )
            state = {"optimizer": opt.state_dict(), "step": done, "rng": torch.get_rng_state()}
            save_checkpoint(ckpt, model, tok, extra=state)
    bar.close()
    seconds = time.time() - t0
    model.eval()
    test = evaluate(
        model,
        proc,
        shapes_eval_set("test", c.test_scenes, c.model.vision.image_size),
        progress=True,
    )
    card = model_card(c, test, seconds, command)
    save_checkpoint(out / "final", model, tok, card=card)
    (out / "final" / "metrics.json").write_text(json.dumps(test, indent=2) + "\n")
    plot_pretrain_log(log_path, out / "curve.png")
    return test
