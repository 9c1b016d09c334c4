"""LiteRT vs PyTorch on shapes:test: greedy generations, logits, perplexity (issue 4's bar).

    .venv/bin/python benchmarks/litert_parity.py runs/tern/final model_ternary.tflite

For every prompt of the first --scenes test scenes: greedy generation on both (equal or not), and
the max |logit difference| over prompt + target positions relative to the logit range; then
perplexity and qa_accuracy of both through the same ``evaluate``.
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm import tqdm

from ternvlm.data.registry import shapes_eval_set
from ternvlm.eval.evaluate import evaluate
from ternvlm.models.checkpoint import load_checkpoint
from ternvlm.models.generate import GenerationConfig, generate_ids
from ternvlm.runtime.vlm import TfliteVLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("tflite")
    ap.add_argument("--scenes", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="litert")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, proc = load_checkpoint(a.checkpoint)
    tv = TfliteVLM(a.tflite, threads=a.threads, backend=a.backend)
    data = shapes_eval_set("test", a.scenes, model.cfg.vision.image_size)
    g = GenerationConfig(max_new_tokens=a.max_new_tokens)
    same, worst = 0, 0.0
    with torch.no_grad():
        for it in tqdm(data.items, desc="prompts"):
            px = proc.pixels([data.images[it.image_id]])
            enc = proc.encode(it.prompt, it.target)
            ids = torch.tensor([enc.ids])
            want = model(ids, pixel_values=px)[0]
            got = tv(ids, pixel_values=px)[0]
            span = float(want.max() - want.min())
            worst = max(worst, float((got - want).abs().max()) / span)
            prompt = enc.ids[: enc.target_start]
            same += tv.generate_ids(prompt, px, g) == generate_ids(model, prompt, px, g)
    m_pt = evaluate(model, proc, data, mismatched=False)
    m_rt = evaluate(tv, tv.processor, data, mismatched=False)
    res = {
        "prompts": len(data.items),
        "same_greedy": same,
        "same_greedy_frac": same / len(data.items),
        "max_logit_diff_over_range": worst,
        "perplexity_pytorch": m_pt["perplexity"],
        "perplexity_litert": m_rt["perplexity"],
        "perplexity_rel_diff": abs(m_rt["perplexity"] / m_pt["perplexity"] - 1),
        "qa_accuracy_pytorch": m_pt["qa_accuracy"],
        "qa_accuracy_litert": m_rt["qa_accuracy"],
    }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
