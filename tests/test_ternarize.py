"""The ternarization trainer on a tiny model: CLI run, packed output, resume, Accelerate, errors."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ternvlm.cli import main
from ternvlm.errors import TernvlmError
from ternvlm.models.checkpoint import load_checkpoint, save_checkpoint
from ternvlm.models.vlm import VLM
from ternvlm.quant.api import quant_layers
from ternvlm.quant.config import QuantConfig
from ternvlm.quant.linear import QuantLinear
from ternvlm.train.pretrain import TrainStream
from ternvlm.train.ternarize import (
    StudentStep,
    TernarizeConfig,
    distill_step,
    distill_terms,
    make_optimizer,
    make_student,
    prepare_teacher,
    teacher_logits,
)

from .conftest import tiny_config

FAST = [
    "--batch-images",
    "2",
    "--val-scenes",
    "4",
    "--test-scenes",
    "4",
    "--threads",
    "1",
    "--data-workers",
    "0",
]


def _cmd(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["ternarize", str(ckpt), "--out", str(out), *FAST, *extra]


def _log_steps(out: Path) -> list[int]:
    if not (out / "log.csv").exists():
        return []
    with open(out / "log.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()
    }


@pytest.mark.parametrize("bits", ["ternary", "binary"])
def test_ternarize_writes_a_packed_model_that_eval_loads(tiny_ckpt, tmp_path, bits, capsys):
    out = tmp_path / "run"
    assert main(_cmd(tiny_ckpt, out, "--bits", bits, "--steps", "4", "--eval-every", "2")) == 0
    assert _log_steps(out) == [0, 2, 4]
    model, _ = load_checkpoint(out / "final")
    layers = quant_layers(model)
    assert layers and model.cfg.quantization_config["bits"] == bits
    allowed = {-1, 1} if bits == "binary" else {-1, 0, 1}
    for m in layers.values():
        assert set(m.codes().unique().tolist()) <= allowed
    sd = load_file(str(out / "final" / "model.safetensors"))
    assert all(sd[f"{n}.qweight"].dtype == torch.uint8 for n in layers)
    assert "ternary model" in (out / "final" / "README.md").read_text() or bits == "binary"
    capsys.readouterr()
    assert main(["eval", str(out / "final"), "--data", "shapes:val", "--limit", "2", "--json"]) == 0
    assert '"perplexity"' in capsys.readouterr().out


def test_refuses_to_overwrite_and_to_resume_another_architecture(
    tiny_ckpt, tmp_path, tokenizer, capsys
):
    out = tmp_path / "run"
    assert main(_cmd(tiny_ckpt, out, "--steps", "2", "--eval-every", "1")) == 0
    before = _digest(out / "checkpoint")
    assert main(_cmd(tiny_ckpt, out, "--steps", "4")) == 2
    assert "pass --resume" in capsys.readouterr().err
    other = tmp_path / "other"
    save_checkpoint(other, VLM(tiny_config(tokenizer.get_vocab_size(), mlp_bias=True)), tokenizer)
    assert main(_cmd(other, out, "--steps", "4", "--resume")) == 2
    assert "different architecture" in capsys.readouterr().err
    assert main(_cmd(tiny_ckpt, out, "--steps", "4", "--resume", "--init", "absmean")) == 2
    assert "another quantization config" in capsys.readouterr().err
    assert _digest(out / "checkpoint") == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--init", "median"], "unknown ternary init"),
        (["--granularity", "group:7"], "does not divide"),
        (["--granularity", "cols"], "unknown granularity"),
        (["--parts", "audio"], "unknown parts"),
        (["--bits", "binary", "--init", "twn"], "unknown binary init"),
        (["--parts", "vision,decoder", "--freeze-vision"], "which --freeze-vision keeps float"),
        (["--parts", "connector", "--freeze-connector"], "--freeze-connector keeps float"),
    ],
)
def test_bad_quantization_options(tiny_ckpt, tmp_path, args, message, capsys):
    assert main(_cmd(tiny_ckpt, tmp_path / "r", "--steps", "2", *args)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r" / "checkpoint").exists()


def test_refuses_an_already_quantized_model(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_cmd(tiny_ckpt, out, "--steps", "1")) == 0
    assert main(_cmd(out / "final", tmp_path / "again", "--steps", "1")) == 2
    assert "already quantized" in capsys.readouterr().err


# --- memory options: bf16 teacher, gradient checkpointing, frozen float vision -----------------


def _batch(proc, seed: int = 3):
    c = TernarizeConfig(batch_images=2, seqs_per_image=2, caption_prob=0.5, seed=seed)
    return TrainStream(proc, c, 0).batch(0)


def _frozen_teacher(model: VLM, dtype: str = "fp32") -> VLM:
    return prepare_teacher(copy.deepcopy(model), TernarizeConfig(teacher_dtype=dtype))


def test_grad_checkpointing_gives_the_same_loss_and_gradients(tiny):
    model, proc = tiny
    teacher = _frozen_teacher(model)
    pixels, batches = _batch(proc)
    ids, index = [b.input_ids for b in batches], [b.image_index for b in batches]
    t_logits = teacher_logits(teacher, pixels, ids, index)
    results = []
    for ckpt in (False, True):
        student, _ = make_student(teacher, TernarizeConfig(grad_checkpointing=ckpt))
        assert student.decoder.gradient_checkpointing is ckpt
        assert student.vision.gradient_checkpointing is ckpt
        calls = []
        for block in (student.vision.layers[0], student.decoder.layers[0]):
            block.register_forward_pre_hook(lambda *_, c=calls: c.append(1))
        s_logits = StudentStep(student).train()(pixels, ids, index)
        kd, ce = distill_terms(s_logits, t_logits, [b.labels for b in batches], 1.0)
        (kd + 0.5 * ce).backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        results.append((kd.item(), ce.item(), grads, len(calls)))
    (kd0, ce0, g0, n0), (kd1, ce1, g1, n1) = results
    assert n1 == 2 * n0  # checkpointed blocks ran again in the backward pass
    assert kd0 == pytest.approx(kd1, rel=1e-6) and ce0 == pytest.approx(ce1, rel=1e-6)
    assert g0.keys() == g1.keys() and any(n.startswith("vision.") for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)
    with torch.no_grad():  # inference is untouched by the flag
        assert torch.equal(model(ids[0], pixels[index[0]]), teacher(ids[0], pixels[index[0]]))


def test_bf16_teacher_logits_close_to_fp32(default_model):
    model, proc = default_model
    pixels, batches = _batch(proc)
    ids, index = [b.input_ids for b in batches], [b.image_index for b in batches]
    f32 = teacher_logits(_frozen_teacher(model, "fp32"), pixels, ids, index)
    t16 = _frozen_teacher(model, "bf16")
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in t16.parameters())
    assert not t16.training
    b16 = teacher_logits(t16, pixels, ids, index)
    # the weights stay bfloat16 (half the bytes) after the forward, which computed in float32
    assert all(p.dtype == torch.bfloat16 for p in t16.parameters())
    assert {b.dtype for b in t16.buffers() if b.is_floating_point()} == {torch.float32}
    assert torch.equal(
        t16.decoder.lm_head.weight.float(), model.decoder.lm_head.weight.bfloat16().float()
    )
    rounded = copy.deepcopy(model)  # what bf16 storage computes: rounded weights, in float32
    for p in rounded.parameters():
        p.data = p.data.bfloat16().float()
    for a, b in zip(teacher_logits(rounded, pixels, ids, index), b16, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    labels = [b.labels for b in batches]
    for a, b, y in zip(f32, b16, labels, strict=True):
        assert b.dtype == torch.float32
        mask = y != -100
        a, b = a[mask], b[mask]
        assert float((a - b).abs().max()) <= 0.03 * float(a.max() - a.min())
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95
    kd, _ = distill_terms(f32, b16, labels, 1.0)  # KL(bf16 teacher || fp32 teacher), nats/token
    assert kd.dtype == torch.float32 and float(kd) < 1e-2


def test_bf16_teacher_runs_every_architecture_option(tokenizer):
    """CLIP tower options, an MLP connector and a Phi-style decoder forward in bfloat16."""
    from ternvlm.config import ConnectorConfig, VisionConfig
    from ternvlm.models.processor import Processor

    cfg = tiny_config(
        tokenizer.get_vocab_size(),
        norm="layernorm",
        mlp_type="gelu",
        parallel_block=True,
        partial_rotary=0.5,
        attn_bias=True,
    )
    cfg.vision = VisionConfig(
        image_size=32, patch_size=8, hidden=32, layers=1, heads=2, mlp=64, act="quick_gelu",
        patch_bias=False, class_token=True, pre_norm=True, post_norm=False, drop_first_token=True,
    )  # fmt: skip
    cfg.connector = ConnectorConfig(scale_factor=2, kind="mlp")
    torch.manual_seed(0)
    model = VLM(cfg).eval()
    pixels, batches = _batch(Processor(model.cfg, tokenizer))
    ids, index = [b.input_ids for b in batches], [b.image_index for b in batches]
    f32 = teacher_logits(_frozen_teacher(model), pixels, ids, index)
    b16 = teacher_logits(_frozen_teacher(model, "bf16"), pixels, ids, index)
    for a, b in zip(f32, b16, strict=True):
        assert float((a - b).abs().max()) <= 0.03 * float(a.max() - a.min())


def test_frozen_vision_teacher_without_grads_and_optimizer_only_trainable(tiny):
    from accelerate import Accelerator

    model, proc = tiny
    c = TernarizeConfig(freeze_vision=True, grad_checkpointing=True, teacher_dtype="bf16")
    teacher = model
    student, report = make_student(teacher, c.validate())
    prepare_teacher(teacher, c)
    assert not any(n.startswith("vision.") for n in report.layers)
    assert not any(isinstance(m, QuantLinear) for m in student.vision.modules())
    assert quant_layers(student.connector) and quant_layers(student.decoder)
    assert tuple(student.cfg.quantization_config["parts"]) == ("connector", "decoder")
    assert teacher.cfg.quantization_config is None
    assert not student.vision.gradient_checkpointing and student.decoder.gradient_checkpointing
    vision0 = {k: v.clone() for k, v in student.vision.state_dict().items()}
    opt = make_optimizer(student, c)
    trainable = {id(p) for p in student.parameters() if p.requires_grad}
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == trainable
    assert not {id(p) for p in student.vision.parameters()} & held
    acc = Accelerator(cpu=True)
    step_mod, opt = acc.prepare(StudentStep(student), opt)
    step_mod.train()
    latent0 = student.decoder.layers[0].mlp.up_proj.latent.detach().clone()
    for s in range(2):
        pixels, batches = _batch(proc, seed=s)
        loss, kd, ce = distill_step(teacher, step_mod, student, opt, acc, pixels, batches, c)
        assert torch.isfinite(loss) and not loss.requires_grad
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in student.vision.parameters())
    for k, v in student.vision.state_dict().items():
        assert torch.equal(v, vision0[k]), k
    assert not torch.equal(student.decoder.layers[0].mlp.up_proj.latent, latent0)
    assert {id(p) for p in opt.state} <= trainable


def test_config_rejects_bad_memory_options():
    with pytest.raises(TernvlmError, match="unknown teacher dtype 'fp16'"):
        TernarizeConfig(teacher_dtype="fp16").validate()
    with pytest.raises(TernvlmError, match="grad_checkpointing must be true or false"):
        TernarizeConfig(grad_checkpointing="yes").validate()
    with pytest.raises(TernvlmError, match="nothing left to quantize"):
        TernarizeConfig(quant=QuantConfig(parts=("vision",)), freeze_vision=True).validate()
    q = TernarizeConfig(freeze_vision=True, freeze_connector=True).validate().student_quant()
    assert q.parts == ("decoder",)
    assert TernarizeConfig(quant=None, freeze_vision=True).validate().student_quant() is None


def test_cli_rejects_an_unknown_teacher_dtype(tiny_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(_cmd(tiny_ckpt, tmp_path / "r", "--teacher-dtype", "fp16"))
    assert exc.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "opts", [["--teacher-dtype", "bf16"], ["--grad-checkpointing"], ["--freeze-vision"]]
)
def test_memory_options_train_save_and_load(tiny_ckpt, tmp_path, opts, capsys):
    out = tmp_path / "run"
    assert main(_cmd(tiny_ckpt, out, "--steps", "2", "--eval-every", "1", *opts)) == 0
    assert _log_steps(out) == [0, 1, 2]
    model, _ = load_checkpoint(out / "final")
    teacher, _ = load_checkpoint(tiny_ckpt)
    layers = quant_layers(model)
    assert any(n.startswith("decoder.") for n in layers)
    frozen = "--freeze-vision" in opts
    assert any(n.startswith("vision.") for n in layers) != frozen
    assert ("vision" in model.cfg.quantization_config["parts"]) != frozen
    if frozen:  # float vision, saved as is and bit-identical to the teacher's
        sd = load_file(str(out / "final" / "model.safetensors"))
        assert "vision.layers.0.mlp.fc1.weight" in sd
        assert not any(k.startswith("vision.") and k.endswith(".qweight") for k in sd)
        for k, v in teacher.vision.state_dict().items():
            assert torch.equal(model.vision.state_dict()[k], v), k
        assert "frozen in float: vision" in (out / "final" / "README.md").read_text()
        state = torch.load(out / "checkpoint" / "train_state.pt", weights_only=False)
        for k, v in teacher.vision.state_dict().items():
            assert torch.equal(state["student"][f"vision.{k}"], v), k
        # a resume must keep the frozen parts (they decide the optimizer's parameter groups)
        capsys.readouterr()
        assert main(_cmd(tiny_ckpt, out, "--steps", "3", "--resume", "--parts", "decoder")) == 2
        assert "another quantization config" in capsys.readouterr().err
        # the export path: vision and its pixels stay fp32, the rest packed
        from ternvlm.export import graphs
        from ternvlm.export.linear import describe_parts, export_copy

        parts = describe_parts(model, "ternary")
        assert parts["vision"] == "fp32" and parts["layers"].startswith("ternary")
        px = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            want = model.encode_image(px)
            got = graphs.EncodeImage(export_copy(model, "ternary"))(px)
        assert float((got - want).abs().max()) <= 0.05 * float(want.abs().max())
    else:
        assert all(isinstance(m, QuantLinear) for m in layers.values())
    capsys.readouterr()
    assert main(["eval", str(out / "final"), "--data", "shapes:val", "--limit", "2", "--json"]) == 0
    assert '"perplexity"' in capsys.readouterr().out


def test_resume_refuses_other_frozen_parts(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    seed = ["--preset", "seed"]  # decoder-only quantization: freezing the vision keeps the config
    assert main(_cmd(tiny_ckpt, out, "--steps", "2", "--eval-every", "1", *seed)) == 0
    capsys.readouterr()
    assert main(_cmd(tiny_ckpt, out, "--steps", "3", "--resume", "--freeze-vision", *seed)) == 2
    assert "made with freeze_vision=False" in capsys.readouterr().err


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "ternvlm.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        **kw,
    )


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tiny_ckpt, tmp_path):
    args = ["--steps", "30", "--eval-every", "5"]
    ref = _run_cli(_cmd(tiny_ckpt, tmp_path / "ref", *args))
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()
    out = tmp_path / "killed"
    p = _run_cli(_cmd(tiny_ckpt, out, *args))
    deadline = time.time() + 300
    while max(_log_steps(out), default=0) < 10 and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "final").exists()
    r = _run_cli(_cmd(tiny_ckpt, out, *args, "--resume"))
    assert r.wait(timeout=300) == 0, r.stderr.read().decode()
    a = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = torch.load(tmp_path / "ref" / "checkpoint" / "train_state.pt", weights_only=False)
    sb = torch.load(out / "checkpoint" / "train_state.pt", weights_only=False)
    for k, v in sa["student"].items():
        assert torch.equal(v, sb["student"][k]), k


@pytest.mark.slow
def test_two_process_accelerate_run(tiny_ckpt, tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    out = tmp_path / "ddp"
    cmd = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "ternvlm.cli",
        *_cmd(tiny_ckpt, out, "--steps", "4", "--eval-every", "2"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _log_steps(out) == [0, 2, 4]
    model, _ = load_checkpoint(out / "final")
    assert quant_layers(model)


# --- the user's own distillation data -----------------------------------------------------


def _folder(root, rows):
    from PIL import Image

    root.mkdir()
    for i, _ in enumerate(rows):
        Image.new("RGB", (40 + 8 * i, 30), (40 * i, 200, 90)).save(root / f"{i}.png")
    lines = [json.dumps({"file_name": f"{i}.png", **r}) for i, r in enumerate(rows)]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_imagefolder_data_trains_and_evaluates(tiny_ckpt, tmp_path):
    from ternvlm.models.checkpoint import load_checkpoint as load
    from ternvlm.train.folder_stream import FolderStream

    rows = [
        {"text": "a green square"},
        {"question": "what colour is the square?", "answer": "green"},
        {"text": "a large green circle", "question": "how many shapes?", "answer": "one"},
    ]
    folder = _folder(tmp_path / "photos", rows)
    out = tmp_path / "run"
    args = ["--steps", "2", "--data", f"imagefolder:{folder}", "--val-scenes", "2"]
    assert main(_cmd(tiny_ckpt, out, *args, "--test-scenes", "3")) == 0
    assert (out / "final").exists() and _log_steps(out) == [0, 2]
    # the stream: every text of a drawn image is one of that image's rows; resumable by step
    from ternvlm.data.registry import load_eval_set

    _, proc = load(tiny_ckpt)
    data = load_eval_set(f"imagefolder:{folder}")
    c = TernarizeConfig(batch_images=3, seqs_per_image=2, seed=5)
    s = FolderStream(proc, c, data, 0)
    pixels, batches = s.batch(4)
    again_pixels, again = FolderStream(proc, c, data, 4).batch(4)
    assert torch.equal(pixels, again_pixels) and torch.equal(
        batches[0].input_ids, again[0].input_ids
    )
    assert pixels.shape[0] == 3 and batches[0].input_ids.shape[0] == 6


def test_bad_training_data_is_named(tiny_ckpt, tmp_path, capsys):
    assert main(_cmd(tiny_ckpt, tmp_path / "r", "--data", "laion")) == 2
    assert "unknown training data 'laion'" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    assert main(_cmd(tiny_ckpt, tmp_path / "r2", "--data", f"imagefolder:{missing}")) == 2
    assert "image folder not found" in capsys.readouterr().err
