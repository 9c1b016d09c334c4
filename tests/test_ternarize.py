"""The ternarization trainer on a tiny model: CLI run, packed output, resume, Accelerate, errors."""

from __future__ import annotations

import csv
import hashlib
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
from ternvlm.models.checkpoint import load_checkpoint, save_checkpoint
from ternvlm.models.vlm import VLM
from ternvlm.quant.api import quant_layers

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
