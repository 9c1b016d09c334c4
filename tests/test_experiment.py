"""The init experiment end to end on a tiny model: folders, CSV, plot, table, resumability."""

import csv

from ternvlm.cli import main


def test_init_experiment_writes_curves_plot_and_table(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "exp"
    args = [
        "experiment", "inits", "--out", str(out), "--model", str(tiny_ckpt),
        "--steps", "4", "--eval-every", "2", "--bits", "ternary,binary",
        "--inits", "kmeans,twn", "--batch-images", "2", "--val-scenes", "4",
        "--test-scenes", "4", "--threads", "1",
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    names = ["ternary-kmeans", "ternary-twn", "binary-kmeans", "float-control"]
    for name in names:
        assert (out / name / "final" / "metrics.json").exists()
        assert f"| {name} |" in printed
    assert not (out / "binary-twn").exists()  # TWN is ternary only
    assert (out / "curves.png").stat().st_size > 1000
    with open(out / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["run"] for r in rows} == set(names)
    assert {int(r["step"]) for r in rows} == {0, 1, 2, 3, 4}
    # a second call finds every run finished and only rebuilds the summary
    assert main(args) == 0
    assert capsys.readouterr().out.count("done, skipping") == len(names)
