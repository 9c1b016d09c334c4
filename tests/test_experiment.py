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


def test_aggregate_over_seeds():
    from ternvlm.experiments.inits import aggregate, aggregate_table

    def res(k, t):
        return {
            "runs": {
                "ternary-kmeans": {"steps_to": k, "zero_step_ratio": 1.2, "test_perplexity": 1.1},
                "ternary-twn": {"steps_to": t, "zero_step_ratio": 1.3, "test_perplexity": 1.2},
            }
        }

    per_seed = {
        1: res({"1.2": 1, "1.1": 3, "1.05": 11, "1.02": 51}, {"1.2": 2, "1.1": 6, "1.05": 13, "1.02": None}),
        2: res({"1.2": 1, "1.1": 6, "1.05": 11, "1.02": 55}, {"1.2": 1, "1.1": 7, "1.05": 11, "1.02": 61}),
    }  # fmt: skip
    agg = aggregate(per_seed)
    k, t = agg["runs"]["ternary-kmeans"], agg["runs"]["ternary-twn"]
    assert k["1.1"] == {"per_seed": [3, 6], "mean": 4.5}
    assert t["1.02"]["mean"] is None  # one seed never reached it: no mean
    table = aggregate_table(agg)
    assert "| ternary-kmeans | 1.0 (1/1) | 4.5 (3/6) | 11.0 (11/11) | 53.0 (51/55) |" in table
    assert "| ternary-twn |" in table and "- (-/61)" in table
