"""``ternvlm demo`` end to end on a tiny model (the real one runs in ``make demo``)."""

from ternvlm.cli import main


def test_demo_captions_evaluates_and_ternarizes(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--model",
        str(tiny_ckpt),
        "--out",
        str(out),
        "--images",
        "1",
        "--eval-scenes",
        "8",
    ]
    assert main([*args, "--ternarize-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert (out / "gallery.png").stat().st_size > 1000
    assert "qa_accuracy" in printed
    for row in ("original", "ternary", "binary"):
        assert any(line.startswith(row) and "MB" in line for line in printed.splitlines()), row
    assert (out / "ternvlm_run" / "final" / "model.safetensors").exists()
    # the LiteRT leg: both models exported with our custom ops and generating like PyTorch
    assert (out / "ternvlm_run" / "model_ternary.tflite").stat().st_size > 1000
    assert (out / "binary_run" / "model_binary.tflite").stat().st_size > 1000
    lines = [x for x in printed.splitlines() if "LiteRT generations equal to PyTorch" in x]
    assert len(lines) == 2 and all("6/6" in x for x in lines), lines
