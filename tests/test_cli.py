"""Bad input gives a one-line error and a non-zero exit, never a traceback or a wrong answer."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from ternvlm.cli import main
from ternvlm.models.checkpoint import save_checkpoint
from ternvlm.models.vlm import VLM

from .conftest import tiny_config


@pytest.fixture()
def ckpt(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = VLM(tiny_config(tokenizer.get_vocab_size()))
    save_checkpoint(tmp_path / "ck", model, tokenizer)
    return tmp_path / "ck"


@pytest.fixture()
def png(tmp_path):
    p = tmp_path / "img.png"
    Image.new("RGB", (50, 70), (200, 10, 10)).save(p)
    return p


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ternvlm: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_checkpoint(capsys, tmp_path, png):
    code, _, err = run(capsys, "generate", tmp_path / "nope", "--image", png)
    one_line_error(code, err, "checkpoint not found")


@pytest.mark.parametrize(
    "damage",
    [
        "weights_garbage",
        "weights_truncated",
        "weights_missing",
        "config_garbage",
        "tokenizer_garbage",
        "shape",
    ],
)
def test_corrupt_checkpoint(capsys, ckpt, png, damage):
    w = ckpt / "model.safetensors"
    if damage == "weights_garbage":
        w.write_bytes(b"\x00\x01garbage" * 10)
    elif damage == "weights_truncated":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif damage == "weights_missing":
        w.unlink()
    elif damage == "config_garbage":
        (ckpt / "config.json").write_text("{not json")
    elif damage == "tokenizer_garbage":
        (ckpt / "tokenizer.json").write_text("[1, 2")
    elif damage == "shape":
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["decoder"]["mlp"] = 80
        (ckpt / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, "generate", ckpt, "--image", png)
    one_line_error(code, err)


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage", "truncated", "directory"])
def test_bad_images(capsys, ckpt, tmp_path, kind):
    p = tmp_path / "bad.png"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "garbage":
        p.write_bytes(b"this is not an image at all")
    elif kind == "truncated":
        Image.new("RGB", (64, 64), "blue").save(tmp_path / "ok.jpg")
        p.write_bytes((tmp_path / "ok.jpg").read_bytes()[:40])
    elif kind == "directory":
        p.mkdir()
    code, _, err = run(capsys, "generate", ckpt, "--image", p)
    one_line_error(code, err, str(p))


@pytest.mark.parametrize(
    "mode,size,ext",
    [
        ("RGBA", (10, 300), "png"),
        ("L", (64, 64), "png"),
        ("RGB", (640, 480), "jpg"),
        ("P", (33, 17), "png"),
        ("I;16", (20, 20), "png"),
        ("CMYK", (40, 40), "jpg"),
    ],
)
def test_any_image_mode_and_size_is_accepted(capsys, ckpt, tmp_path, mode, size, ext):
    p = tmp_path / f"x.{ext}"
    Image.new(mode, size).save(p)
    code, out, err = run(
        capsys,
        "generate",
        ckpt,
        "--image",
        p,
        "--prompt",
        "how many shapes are there?",
        "--max-new-tokens",
        "3",
    )
    assert code == 0, err


def test_unknown_data_name(capsys, ckpt):
    code, _, err = run(capsys, "eval", ckpt, "--data", "coco:val")
    one_line_error(code, err, "unknown data set")
    code, _, err = run(capsys, "eval", ckpt, "--data", "shapes:holdout")
    one_line_error(code, err, "unknown shapes split")


def test_prompt_longer_than_context(capsys, ckpt, png):
    code, _, err = run(capsys, "generate", ckpt, "--image", png, "--prompt", "what " * 200)
    one_line_error(code, err, "prompt is too long")


def test_eval_json_fields(capsys, ckpt):
    code, out, _ = run(capsys, "eval", ckpt, "--data", "shapes:val", "--limit", "4", "--json")
    assert code == 0
    m = json.loads(out)
    for k in ("perplexity", "perplexity_mismatched_image", "qa_accuracy", "n_examples"):
        assert k in m


def test_subprocess_prints_no_traceback(tmp_path):
    bad = tmp_path / "zero.png"
    bad.write_bytes(b"")
    r = subprocess.run(
        [sys.executable, "-m", "ternvlm.cli", "generate", "default", "--image", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "0 bytes" in r.stderr
