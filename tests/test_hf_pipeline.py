"""Hugging Face VLMs through the whole pipeline: ternarize -> export -> LiteRT.

For each architecture (Idefics3/SmolVLM, LLaVA with a CLIP tower, Moondream2) a tiny random
checkpoint in its own folder layout goes through ``ternvlm ternarize`` (a few QAT steps),
``ternvlm export`` (TernaryMatMul, int8 head) and runs on LiteRT, whose logits and greedy
generations must equal our PyTorch export copy's. Float activations: with int8 activations a
rounding tie resolved differently flips one int8 step, which at these tiny widths (32) moves
a logit by about 1% (test_export covers the int8-activation kernels against their emulation).
"""

from __future__ import annotations

import pytest
import torch

from ternvlm.cli import main
from ternvlm.models.generate import GenerationConfig, generate_ids

from . import test_hf_idefics3, test_hf_llava, test_hf_moondream

pytest.importorskip("transformers")
pytest.importorskip("litert_torch")

ARCHS = ("idefics3", "llava", "moondream2")


def hf_folder(arch: str, tmp_path_factory, tokenizer):
    if arch == "idefics3":
        return test_hf_idefics3.build(tmp_path_factory, tokenizer, tie=False)[1]
    if arch == "llava":
        return test_hf_llava.build(tmp_path_factory, tokenizer, "clip")[1]
    folder = tmp_path_factory.mktemp("moondream2")
    test_hf_moondream.write_checkpoint(folder, tokenizer)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_ternarize_export_and_litert_generation(arch, tmp_path_factory, tokenizer, capsys):
    from ternvlm.data import shapes
    from ternvlm.export.linear import export_copy
    from ternvlm.models.checkpoint import load_checkpoint
    from ternvlm.runtime.vlm import TfliteVLM

    folder = hf_folder(arch, tmp_path_factory, tokenizer)
    out = tmp_path_factory.mktemp(f"{arch}_tern")
    args = ["--steps", "3", "--batch-images", "2", "--eval-every", "100", "--threads", "1"]
    args += ["--val-scenes", "2", "--test-scenes", "2"]
    assert main(["ternarize", str(folder), "--out", str(out / "run"), *args]) == 0
    final = out / "run" / "final"
    model, proc = load_checkpoint(final)
    assert model.cfg.architecture == arch and model.cfg.quantization_config is not None
    tflite = out / "model.tflite"
    prefill = model.cfg.image_tokens + 24
    export_args = ["--ops", "ternary", "--act", "f32", "--head", "int8"]
    assert main(["export", str(final), "--out", str(tflite), "--prefill-len", str(prefill),
                 *export_args]) == 0  # fmt: skip
    capsys.readouterr()

    copy = export_copy(model, "ternary", "f32", "int8")
    tv = TfliteVLM(tflite, threads=1)
    assert type(tv.processor) is type(proc)  # the prompt template survives the export
    g = GenerationConfig(max_new_tokens=8)
    with torch.no_grad():
        for i, q in enumerate(["what shape is at the top left?", "what colour is the circle?"]):
            img = shapes.render(shapes.scene_for("test", i), model.cfg.vision.image_size)
            enc = proc.encode(proc_prompt(q))
            px = proc.pixels([img])
            want = copy(torch.tensor([enc.ids]), pixel_values=px)[0]
            got = tv(torch.tensor([enc.ids]), pixel_values=px)[0]
            span = float(want.max() - want.min())
            assert float((got - want).abs().max()) <= 1e-3 * span, arch
            assert tv.generate_ids(enc.ids, px, g) == generate_ids(copy, enc.ids, px, g)
    tv.close()


def proc_prompt(question: str) -> str:
    from ternvlm.models.processor import qa_prompt

    return qa_prompt(question)


def test_hub_ids_on_the_command_line(monkeypatch, tmp_path_factory, tokenizer, capsys, tmp_path):
    """``owner/name[@revision]`` reaches huggingface_hub (revision included) from the CLI; a
    local path always wins, and no network is a one-line error with the download command."""
    hub = pytest.importorskip("huggingface_hub")
    from PIL import Image

    folder = hf_folder("idefics3", tmp_path_factory, tokenizer)
    image = tmp_path / "img.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    calls = []

    def fake_download(repo, revision=None, allow_patterns=None):
        calls.append((repo, revision))
        return str(folder)

    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    gen = ["generate", "--image", str(image), "--max-new-tokens", "3", "--threads", "1"]
    assert main([*gen[:1], "HuggingFaceTB/SmolVLM-256M-Instruct@main", *gen[1:]]) == 0
    assert calls == [("HuggingFaceTB/SmolVLM-256M-Instruct", "main")]
    assert main([*gen[:1], str(folder), *gen[1:]]) == 0  # a folder never touches the Hub
    assert len(calls) == 1
    capsys.readouterr()

    def no_network(*args, **kwargs):
        raise ConnectionError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(hub, "snapshot_download", no_network)
    assert main([*gen[:1], "vikhyatk/moondream2@2024-05-08", *gen[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert "no network" in err and "hf download vikhyatk/moondream2 --revision 2024-05-08" in err
    assert len(err.splitlines()) == 1
    assert main([*gen[:1], "./no/such/folder", *gen[1:]]) == 2  # not a Hub id: no download
    assert "checkpoint not found" in capsys.readouterr().err
