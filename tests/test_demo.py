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
