"""The init experiment: does k-means initialization shorten ternarization?

Fine-tunes the same pre-trained model from each init (kmeans, absmean, twn, random; ternary and
binary) with the same budget, plus a float control trained with the same loss (its cross-entropy
term is extra training, so a quantized model can end below a non-converged original). Every run
is a resumable ``ternarize`` run in its own folder: an interrupted experiment continues where it
stopped. Outputs: ``curves.csv``, ``curves.png``, ``table.md`` and ``results.json``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..quant.config import QuantConfig
from ..train.ternarize import TernarizeConfig, ternarize

TARGETS = (1.2, 1.1, 1.05, 1.02)


@dataclass
class InitExperimentConfig:
    model: str = "default"
    bits: tuple[str, ...] = ("ternary", "binary")
    inits: tuple[str, ...] = ("kmeans", "absmean", "twn", "random")
    granularity: str = "row"
    control: bool = True
    seeds: tuple[int, ...] = (1,)  # several seeds: one sub-folder each, plus an aggregate table
    train: TernarizeConfig = field(
        default_factory=lambda: TernarizeConfig(
            steps=300, eval_every=25, eval_early=(1, 2, 4, 8, 15), test_scenes=256
        )
    )


def run_names(c: InitExperimentConfig) -> list[tuple[str, QuantConfig | None]]:
    runs: list[tuple[str, QuantConfig | None]] = []
    for bits in c.bits:
        for init in c.inits:
            if bits == "binary" and init == "twn":
                continue  # TWN is a ternary method
            q = QuantConfig(bits=bits, init=init, granularity=c.granularity, name=init)
            runs.append((f"{bits}-{init}", q.validate()))
    if c.control:
        runs.append(("float-control", None))
    return runs


def read_curve(folder: Path) -> list[dict]:
    with open(folder / "log.csv") as f:
        return [
            {
                "step": int(r["step"]),
                "perplexity": float(r["perplexity"]),
                "qa_accuracy": float(r["qa_accuracy"]),
            }
            for r in csv.DictReader(f)
            if r["perplexity"]
        ]


def steps_to(curve: list[dict], target_ppl: float) -> int | None:
    """First evaluated step whose validation perplexity is at most ``target_ppl``."""
    return next((p["step"] for p in curve if p["perplexity"] <= target_ppl), None)


def summarize(out: Path, names: list[str]) -> dict:
    teacher = json.loads((out / names[0] / "teacher_val.json").read_text())
    base = teacher["perplexity"]
    rows = {}
    for name in names:
        curve = read_curve(out / name)
        final = json.loads((out / name / "final" / "metrics.json").read_text())
        rows[name] = {
            "zero_step_ratio": curve[0]["perplexity"] / base if curve[0]["step"] == 0 else None,
            "steps_to": {str(t): steps_to(curve, t * base) for t in TARGETS},
            "final_val_ratio": curve[-1]["perplexity"] / base,
            "test_perplexity": final["perplexity"],
            "test_qa_accuracy": final["qa_accuracy"],
            "original_test_perplexity": final["original"]["perplexity"],
            "original_test_qa_accuracy": final["original"]["qa_accuracy"],
            "init": final.get("init", {}),
            "curve": curve,
        }
    return {"original_val_perplexity": base, "runs": rows}


def table(res: dict) -> str:
    head = (
        "| run | step-0 ppl ratio | "
        + " | ".join(f"steps to {t}x" for t in TARGETS)
        + " | final val ratio | test ppl | test qa_accuracy |\n"
    )
    head += "|---" * (5 + len(TARGETS)) + "|\n"
    lines = []
    for name, r in res["runs"].items():
        z = r["zero_step_ratio"]
        st = " | ".join("-" if v is None else str(v) for v in r["steps_to"].values())
        lines.append(
            f"| {name} | {'-' if z is None else f'{z:.3f}'} | {st} | {r['final_val_ratio']:.3f} "
            f"| {r['test_perplexity']:.4f} | {r['test_qa_accuracy']:.4f} |"
        )
    first = next(iter(res["runs"].values()))
    foot = (
        f"\nOriginal model: val perplexity {res['original_val_perplexity']:.4f}, test perplexity "
        f"{first['original_test_perplexity']:.4f}, test qa_accuracy "
        f"{first['original_test_qa_accuracy']:.4f}. '-': target not reached within the budget.\n"
    )
    return head + "\n".join(lines) + "\n" + foot


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = sorted({n.split("-")[0] for n in res["runs"] if not n.startswith("float")})
    fig, axes = plt.subplots(1, len(bits), figsize=(6 * len(bits), 4.2), squeeze=False)
    base = res["original_val_perplexity"]
    for ax, b in zip(axes[0], bits, strict=True):
        for name, r in res["runs"].items():
            if name.startswith(b) or name.startswith("float"):
                xs = [p["step"] for p in r["curve"]]
                ys = [p["perplexity"] / base for p in r["curve"]]
                ax.plot(xs, ys, marker=".", label=name, ls="--" if "float" in name else "-")
        for t in TARGETS:
            ax.axhline(t, color="grey", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.set_ylim(0.98, 2.0)  # the targets live here; far-off curves (random) leave the frame
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("val perplexity / original")
        ax.set_title(f"{b}: perplexity recovery by init")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_curves_csv(res: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "step", "perplexity", "ratio", "qa_accuracy"])
        base = res["original_val_perplexity"]
        for name, r in res["runs"].items():
            for p in r["curve"]:
                w.writerow(
                    [name, p["step"], p["perplexity"], p["perplexity"] / base, p["qa_accuracy"]]
                )


def aggregate(per_seed: dict[int, dict]) -> dict:
    """Steps-to per run and target over seeds: the list, the mean, and how often each run won."""
    seeds = sorted(per_seed)
    names = list(per_seed[seeds[0]]["runs"])
    agg: dict = {"seeds": seeds, "runs": {}}
    for name in names:
        row = {}
        for t in TARGETS:
            vals = [per_seed[s]["runs"][name]["steps_to"][str(t)] for s in seeds]
            reached = [v for v in vals if v is not None]
            row[str(t)] = {
                "per_seed": vals,
                "mean": sum(reached) / len(reached) if len(reached) == len(vals) else None,
            }
        row["zero_step_ratio"] = [per_seed[s]["runs"][name]["zero_step_ratio"] for s in seeds]
        row["test_perplexity"] = [per_seed[s]["runs"][name]["test_perplexity"] for s in seeds]
        agg["runs"][name] = row
    return agg


def aggregate_table(agg: dict) -> str:
    head = "| run | " + " | ".join(f"steps to {t}x: mean (per seed)" for t in TARGETS) + " |\n"
    head += "|---" * (1 + len(TARGETS)) + "|\n"
    lines = []
    for name, r in agg["runs"].items():
        cells = []
        for t in TARGETS:
            v = r[str(t)]
            per = "/".join("-" if x is None else str(x) for x in v["per_seed"])
            cells.append(f"{'-' if v['mean'] is None else format(v['mean'], '.1f')} ({per})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + f"\n\nSeeds: {agg['seeds']} (data order of fine-tuning).\n"


def run_inits(out: str | Path, c: InitExperimentConfig) -> dict:
    """Run (or continue) every init's fine-tuning, then write the CSV, plot and table.

    With several seeds each seed's experiment lives in ``out/seed<N>`` and ``out/table.md``
    aggregates them: a one-seed step count can tie by chance (targets are crossed at the end
    of the warm-up), several seeds tell a real lead from luck.
    """
    out = Path(out)
    if len(c.seeds) > 1:
        per_seed = {
            s: run_inits(out / f"seed{s}", replace(c, seeds=(s,), train=replace(c.train, seed=s)))
            for s in c.seeds
        }
        agg = aggregate(per_seed)
        md = aggregate_table(agg)
        (out / "table.md").write_text(md)
        (out / "results.json").write_text(json.dumps(agg, indent=2) + "\n")
        print(md)
        return agg
    runs = run_names(c)
    for name, q in runs:
        folder = out / name
        if (folder / "final" / "metrics.json").exists():
            print(f"{name}: done, skipping")
            continue
        resume = (folder / "checkpoint" / "train_state.pt").exists()
        cfg = replace(c.train, quant=q)
        ternarize(c.model, folder, cfg, resume=resume, command=f"experiment inits: {name}")
    res = summarize(out, [n for n, _ in runs])
    write_curves_csv(res, out / "curves.csv")
    plot(res, out / "curves.png")
    md = table(res)
    (out / "table.md").write_text(md)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    print(md)
    return res
