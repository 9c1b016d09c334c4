"""Ternarization: quantization-aware distillation of a pre-trained VLM into a ternary/binary one.

The student is a copy of the teacher whose Linear layers are swapped for QuantLinear (initialised
from the pre-trained weights, k-means by default); it learns with loss = kd_weight * T^2 *
KL(teacher || student at temperature T) + ce_weight * cross-entropy, on the answer and caption
tokens. Runs on Hugging Face Accelerate, so ``accelerate launch --multi_gpu --num_processes 2 -m
ternvlm.cli ternarize ...`` data-parallelises on CPU (gloo) or GPUs with no code change.
A killed run resumes with ``--resume`` to the same weights as an uninterrupted one.

Memory (a real-size model on a CPU machine, see benchmarks/qat_memory.py): ``teacher_dtype="bf16"``
stores the frozen teacher's weights in bfloat16 (half their memory; it still computes, and gives
its logits for the KD loss, in float32: see models/bf16.py); ``grad_checkpointing`` recomputes
the student's blocks in the backward pass instead of keeping their activations (and dequantized
weights); ``freeze_vision`` / ``freeze_connector`` keep those parts of the student frozen in
float (not quantized, no gradients, no optimizer state). The teacher never holds gradients and
the optimizer only the trainable parameters.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.registry import load_eval_set, shapes_eval_set
from ..errors import TernvlmError
from ..eval.evaluate import evaluate
from ..models.bf16 import store_bf16_
from ..models.checkpoint import CONFIG, load_checkpoint, save_checkpoint
from ..models.vlm import VLM
from ..quant.api import QuantReport, clip_latents_, quantize_
from ..quant.config import QuantConfig
from .pretrain import TrainStream, lr_at

LOG_FIELDS = ["step", "loss", "kd", "ce", "lr", "seconds", "perplexity", "qa_accuracy"]
TEACHER_DTYPES = ("fp32", "bf16")


@dataclass
class TernarizeConfig:
    steps: int = 600
    batch_images: int = 16
    seqs_per_image: int = 4
    caption_prob: float = 0.15
    lr: float = 2e-3  # latent weights, in units of the per-group normalizer m
    float_lr: float = 2e-4  # scales, biases, norms, embeddings
    warmup: int = 20
    min_lr_ratio: float = 0.1
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.5
    grad_clip: float = 1.0
    seed: int = 1
    eval_every: int = 50
    val_scenes: int = 64
    test_scenes: int | None = 256
    threads: int = 2
    data_workers: int = 1
    eval_at_start: bool = True
    eval_early: tuple[int, ...] = ()  # extra evaluation steps (dense early curves)
    quant: QuantConfig | None = field(default_factory=QuantConfig)  # None: float control run
    teacher_dtype: str = "fp32"  # "fp32" or "bf16": the frozen teacher's stored weights
    grad_checkpointing: bool = False  # recompute the student's blocks in the backward pass
    freeze_vision: bool = False  # student vision encoder frozen in float (not quantized)
    freeze_connector: bool = False  # the same for the connector
    # Distillation data: "shapes" (the synthetic world) or "imagefolder:DIR" (your images and
    # texts, train/folder_stream.py; validation and test metrics then come from its first rows).
    data: str = "shapes"

    def validate(self) -> TernarizeConfig:
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise TernvlmError(
                f"unknown teacher dtype {self.teacher_dtype!r}; expected one of "
                f"{', '.join(TEACHER_DTYPES)}"
            )
        for name in ("grad_checkpointing", "freeze_vision", "freeze_connector"):
            if not isinstance(getattr(self, name), bool):
                raise TernvlmError(f"{name} must be true or false, not {getattr(self, name)!r}")
        kind, _, folder = self.data.partition(":")
        if not (self.data == "shapes" or (kind == "imagefolder" and folder)):
            raise TernvlmError(
                f"unknown training data {self.data!r}; use shapes or imagefolder:DIR "
                "(metadata.jsonl with file_name and text, or question and answer)"
            )
        if self.quant is not None:
            self.quant.validate()
            self.student_quant()
        return self

    @property
    def frozen_parts(self) -> tuple[str, ...]:
        return tuple(
            p
            for p, f in (("vision", self.freeze_vision), ("connector", self.freeze_connector))
            if f
        )

    def student_quant(self) -> QuantConfig | None:
        """``quant`` without the frozen parts: what the student's checkpoint records."""
        if self.quant is None or not self.frozen_parts:
            return self.quant
        parts = tuple(p for p in self.quant.parts if p not in self.frozen_parts)
        if not parts:
            raise TernvlmError(
                f"nothing left to quantize: parts {', '.join(self.quant.parts)} are all frozen "
                f"({', '.join(self.frozen_parts)}); quantize the decoder too"
            )
        return dataclasses.replace(self.quant, parts=parts)


class StudentStep(nn.Module):
    """One forward per step over all sub-batches, so DDP sees a single forward call."""

    def __init__(self, student: VLM) -> None:
        super().__init__()
        self.student = student

    def forward(self, pixels: torch.Tensor, ids: list[torch.Tensor], index: list[torch.Tensor]):
        feats = self.student.encode_image(pixels)
        return [self.student(i, image_features=feats[j]) for i, j in zip(ids, index, strict=True)]


def distill_terms(
    s_logits: list[torch.Tensor],
    t_logits: list[torch.Tensor],
    labels: list[torch.Tensor],
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-token KL(teacher || student) * T^2 and cross-entropy over the target tokens."""
    kd, ce, n = 0.0, 0.0, 0
    for s, t, y in zip(s_logits, t_logits, labels, strict=True):
        mask = y != -100
        s, t, y = s[mask], t[mask].to(s.dtype), y[mask]
        kd = kd + F.kl_div(
            F.log_softmax(s / temperature, -1),
            F.log_softmax(t / temperature, -1),
            log_target=True,
            reduction="sum",
        ) * (temperature**2)
        ce = ce + F.cross_entropy(s, y, reduction="sum")
        n += int(mask.sum())
    n = max(n, 1)
    return kd / n, ce / n


def _check_resume(ckpt: Path, teacher: VLM, qcfg: QuantConfig | None) -> None:
    """Refuse to resume a checkpoint made for another architecture or quantization recipe."""
    try:
        saved = json.loads((ckpt / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TernvlmError(f"cannot resume: unreadable {ckpt / CONFIG}: {exc}") from None
    saved_q = saved.pop("quantization_config", None)
    mine = json.loads(json.dumps(teacher.cfg.to_dict()))  # tuples -> lists, as saved
    mine.pop("quantization_config", None)
    if saved != mine:
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        raise TernvlmError(
            f"cannot resume: the checkpoint in {ckpt} is for a different architecture "
            f"(differs in {', '.join(diff)}); nothing was overwritten"
        )
    if saved_q != (json.loads(json.dumps(qcfg.to_dict())) if qcfg else None):
        raise TernvlmError(
            f"cannot resume: the checkpoint in {ckpt} used another quantization config "
            f"({saved_q}); nothing was overwritten"
        )


def _check_resume_options(state: dict, c: TernarizeConfig, ckpt: Path) -> None:
    """The frozen parts decide the optimizer's parameter groups: they must match to resume."""
    saved = state.get("config", {})
    for name in ("freeze_vision", "freeze_connector"):
        if bool(saved.get(name, False)) != getattr(c, name):
            raise TernvlmError(
                f"cannot resume: the checkpoint in {ckpt} was made with {name}="
                f"{bool(saved.get(name, False))}; nothing was overwritten"
            )


def _param_groups(student: VLM, c: TernarizeConfig) -> list[dict]:
    """Latent weights and float parameters; frozen parameters get no optimizer state."""
    trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    latent = [p for n, p in trainable if n.endswith(".latent")]
    other = [p for n, p in trainable if not n.endswith(".latent")]
    return [
        {"params": latent, "lr": c.lr, "base_lr": c.lr, "weight_decay": 0.0},
        {"params": other, "lr": c.float_lr, "base_lr": c.float_lr, "weight_decay": 0.0},
    ]


def make_optimizer(student: VLM, c: TernarizeConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_param_groups(student, c), betas=(0.9, 0.95))


def prepare_teacher(teacher: VLM, c: TernarizeConfig) -> VLM:
    """Frozen in place: no gradients, eval mode; ``bf16``: weights stored in bfloat16 (computed
    in float32 one block at a time, see models/bf16.py)."""
    teacher.requires_grad_(False).eval()
    if c.teacher_dtype == "bf16":
        store_bf16_(teacher)
    return teacher


def make_student(
    teacher: VLM, c: TernarizeConfig, progress: bool = False
) -> tuple[VLM, QuantReport]:
    """A copy of the float teacher (before ``prepare_teacher`` casts it), quantized by
    ``c.student_quant()``, its frozen parts frozen, checkpointing set."""
    if teacher.decoder.norm.weight.dtype != torch.float32:
        raise TernvlmError("internal error: make the student from the float32 teacher")
    student = copy.deepcopy(teacher).requires_grad_(True)
    report = QuantReport()
    qcfg = c.student_quant()
    if qcfg is not None:
        report = quantize_(student, qcfg, progress=progress)
        student.cfg.quantization_config = qcfg.to_dict()
    for part in c.frozen_parts:
        student.get_submodule(part).requires_grad_(False)
    trained = ("decoder",) if c.freeze_vision else ("vision", "decoder")
    student.set_gradient_checkpointing(c.grad_checkpointing, trained)
    return student, report


def teacher_logits(
    teacher: VLM, pixels: torch.Tensor, ids: list[torch.Tensor], index: list[torch.Tensor]
) -> list[torch.Tensor]:
    """The frozen teacher's logits, without an autograd graph."""
    with torch.no_grad():
        tf = teacher.encode_image(pixels)
        return [teacher(i, image_features=tf[j]) for i, j in zip(ids, index, strict=True)]


def distill_step(
    teacher: VLM,
    step_mod: nn.Module,
    student: VLM,
    opt: torch.optim.Optimizer,
    acc,
    pixels: torch.Tensor,
    batches: list,
    c: TernarizeConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step of distillation; returns the (detached) loss, KD and CE terms."""
    ids = [b.input_ids for b in batches]
    index = [b.image_index for b in batches]
    t_logits = teacher_logits(teacher, pixels, ids, index)
    s_logits = step_mod(pixels, ids, index)
    kd, ce = distill_terms(s_logits, t_logits, [b.labels for b in batches], c.temperature)
    del s_logits, t_logits
    loss = c.kd_weight * kd + c.ce_weight * ce
    opt.zero_grad(set_to_none=True)
    acc.backward(loss)
    acc.clip_grad_norm_(step_mod.parameters(), c.grad_clip)
    opt.step()
    clip_latents_(student)
    return loss.detach(), kd.detach(), ce.detach()


def model_card(c: TernarizeConfig, teacher_m: dict, m: dict, report: QuantReport, cmd: str) -> str:
    q = c.student_quant() or QuantConfig(bits="float", init="none")
    frozen = f"- frozen in float: {', '.join(c.frozen_parts)}\n" if c.frozen_parts else ""
    keep = ("perplexity", "perplexity_mismatched_image", "qa_accuracy", "qa_accuracy_novel")
    rows = "\n".join(
        f"| {k} | {teacher_m.get(k, float('nan')):.4f} | {m.get(k, float('nan')):.4f} |"
        for k in keep
    )
    return (
        f"# ternvlm {q.bits} model\n\nDistilled from a pre-trained VLM with quantization-aware "
        f"training (straight-through estimator).\n\n- command: `{cmd}`\n"
        f"- bits: {q.bits}, init: {q.init}, granularity: {q.granularity}, parts: "
        f"{', '.join(q.parts)}, scale: {q.scale}\n- steps: {c.steps}, seed: {c.seed}\n"
        f"- init: {len(report.layers)} layers, max Lloyd iterations {report.max_iterations}, "
        f"mean relative L2 error {report.mean_rel_error:.4f}, {report.seconds:.2f} s\n{frozen}\n"
        f"| metric (shapes:test) | original | this model |\n|---|---|---|\n{rows}\n\n"
        f"## Config\n\n```json\n{json.dumps(asdict(c), indent=2, default=str)}\n```\n"
    )


def _eval_set(c: TernarizeConfig, split: str, image_size: int):
    """Validation / test texts: shapes val/test, or the first rows of the user's image folder."""
    limit = c.val_scenes if split == "val" else c.test_scenes
    if c.data == "shapes":
        return shapes_eval_set(split, limit, image_size)
    return load_eval_set(c.data, limit, image_size)


def _train_stream(proc, c: TernarizeConfig, start: int, rank: int, world: int):
    if c.data == "shapes":
        return TrainStream(proc, c, start, rank, world)
    from .folder_stream import FolderStream

    return FolderStream(proc, c, load_eval_set(c.data, None), start, rank, world)


def ternarize(
    model: str | Path,
    out: str | Path,
    c: TernarizeConfig,
    resume: bool = False,
    command: str = "",
) -> dict:
    """Distil ``model`` into a ternary/binary student; checkpoints in ``out/checkpoint``."""
    from accelerate import Accelerator

    c.validate()
    out = Path(out)
    ckpt = out / "checkpoint"
    state_path = ckpt / "train_state.pt"
    if state_path.exists() and not resume:
        raise TernvlmError(
            f"{out} already holds a ternarization checkpoint; pass --resume to continue it "
            "or choose another --out (nothing was overwritten)"
        )
    if resume and not state_path.exists() and (out / "final").exists():
        raise TernvlmError(f"{out} holds a finished run; choose another --out")
    teacher, proc = load_checkpoint(model)
    if teacher.cfg.quantization_config is not None:
        raise TernvlmError("the model to ternarize is already quantized; give the float original")
    state = None
    if resume and state_path.exists():
        _check_resume(ckpt, teacher, c.student_quant())
        state = torch.load(state_path, weights_only=False)
        _check_resume_options(state, c, ckpt)

    acc = Accelerator(cpu=not torch.cuda.is_available())
    torch.set_num_threads(max(1, c.threads // acc.num_processes))
    torch.manual_seed(c.seed)
    main = acc.is_main_process
    teacher.requires_grad_(False).eval()
    out.mkdir(parents=True, exist_ok=True)
    teacher_path, teacher_test_path = out / "teacher_val.json", out / "teacher_test.json"
    if main and not (teacher_path.exists() and teacher_test_path.exists()):
        # The original's metrics, in float32 whatever teacher_dtype (and before training memory).
        val = _eval_set(c, "val", teacher.cfg.vision.image_size)
        teacher_path.write_text(json.dumps(evaluate(teacher, proc, val, mismatched=False)) + "\n")
        test = _eval_set(c, "test", teacher.cfg.vision.image_size)
        teacher_test_path.write_text(json.dumps(evaluate(teacher, proc, test)) + "\n")
    student, report = make_student(teacher, c, progress=main)
    prepare_teacher(teacher, c)
    opt = make_optimizer(student, c)
    start = 0
    if state is not None:
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = int(state["step"])
        if main:
            print(f"resuming from step {start}")
        del state
    step_mod, opt = acc.prepare(StudentStep(student), opt)
    val = _eval_set(c, "val", teacher.cfg.vision.image_size)
    log_path = out / "log.csv"
    if main and start == 0:
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(LOG_FIELDS)

    def log(row: dict) -> None:
        with open(log_path, "a", newline="") as f:
            csv.DictWriter(f, LOG_FIELDS).writerow(row)

    if main and start == 0 and c.eval_at_start:
        m0 = evaluate(student, proc, val, mismatched=False)
        log({"step": 0, "seconds": 0.0, "perplexity": m0["perplexity"], **_acc(m0)})
    loader = DataLoader(
        _train_stream(proc, c, start, acc.process_index, acc.num_processes),
        batch_size=None,
        num_workers=c.data_workers,
        prefetch_factor=4 if c.data_workers else None,
    )
    it = iter(loader)
    name = c.quant.bits if c.quant else "float control"
    bar = tqdm(total=c.steps, initial=start, desc=f"ternarize {name}", disable=not main)
    t0 = time.time()
    step_mod.train()
    for step in range(start, c.steps):
        pixels, batches = next(it)
        mult = lr_at(step, c) / c.lr
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * mult
        loss, kd, ce = distill_step(teacher, step_mod, student, opt, acc, pixels, batches, c)
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", kd=f"{kd.item():.4f}")
        if done % c.eval_every == 0 or done == c.steps or done in c.eval_early:
            if main:
                m = evaluate(student, proc, val, mismatched=False)
                step_mod.train()
                log(
                    {
                        "step": done,
                        "loss": loss.item(),
                        "kd": kd.item(),
                        "ce": ce.item(),
                        "lr": c.lr * mult,
                        "seconds": time.time() - t0,
                        "perplexity": m["perplexity"],
                        **_acc(m),
                    }
                )
                bar.set_postfix(loss=f"{loss.item():.4f}", val_ppl=f"{m['perplexity']:.4f}")
                extra = {
                    "student": student.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": done,
                    "rng": torch.get_rng_state(),
                    "config": asdict(c),
                }
                save_checkpoint(ckpt, student, proc.tokenizer, extra=extra)
            acc.wait_for_everyone()
    bar.close()
    metrics: dict = {}
    if main:
        test = _eval_set(c, "test", teacher.cfg.vision.image_size)
        teacher_m = json.loads(teacher_test_path.read_text())
        metrics = evaluate(student, proc, test)
        metrics["original"] = {k: v for k, v in teacher_m.items() if not isinstance(v, dict)}
        metrics["init"] = {
            "max_iterations": report.max_iterations,
            "mean_rel_error": report.mean_rel_error,
            "seconds": report.seconds,
        }
        card = model_card(c, teacher_m, metrics, report, command)
        save_checkpoint(out / "final", student, proc.tokenizer, card=card)
        (out / "final" / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    acc.wait_for_everyone()
    return metrics


def _acc(m: dict) -> dict:
    return {"qa_accuracy": m["qa_accuracy"]}
