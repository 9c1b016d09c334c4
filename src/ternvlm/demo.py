"""``ternvlm demo``: the main job on the embedded default model, end to end in a minute."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .data import shapes
from .data.registry import shapes_eval_set
from .eval.evaluate import evaluate
from .models.checkpoint import load_checkpoint, resolve
from .models.generate import GenerationConfig, generate, generate_ids
from .models.processor import CAPTION_PROMPT, qa_prompt


def gallery(rows: list[tuple[Image.Image, list[str]]], path: Path) -> None:
    """Images (upscaled) beside the model's words: easier to judge than text alone."""
    scale, width, line = 3, 620, 14
    h = max(64 * scale, 0)
    sheet = Image.new("RGB", (width, len(rows) * (h + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, texts) in enumerate(rows):
        y = i * (h + 8)
        sheet.paste(img.resize((64 * scale, 64 * scale), Image.Resampling.NEAREST), (0, y))
        for j, t in enumerate(texts):
            draw.text((64 * scale + 10, y + 4 + j * line), t, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def run_demo(
    model_name: str = "default",
    out: str = "demo_out",
    n_images: int = 4,
    ternarize_steps: int = 60,
    eval_scenes: int | None = None,
) -> dict:
    torch.set_num_threads(2)
    t0 = time.time()
    model, proc = load_checkpoint(model_name)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {resolve(model_name)} ({n_params / 1e6:.2f}M parameters)")
    rows = []
    for i in range(n_images):
        s = shapes.make_sample("test", i, model.cfg.vision.image_size)
        cap = generate(model, proc, s.image, CAPTION_PROMPT, GenerationConfig(max_new_tokens=64))
        texts = [f"caption: {cap}", f"truth:   {s.captions[0]}"]
        print(f"\nimage {i}: {cap}\n  (truth: {s.captions[0]})")
        for qa in s.qas[:4]:
            ans = generate(
                model, proc, s.image, qa_prompt(qa.question), GenerationConfig(max_new_tokens=8)
            )
            mark = "ok" if ans == qa.answer else f"expected {qa.answer}"
            print(f"  Q: {qa.question}  A: {ans}  [{mark}]")
            texts.append(f"Q: {qa.question}  A: {ans}  [{mark}]")
        rows.append((s.image, texts))
    path = Path(out) / "gallery.png"
    gallery(rows, path)
    print(f"\ngallery: {path}")
    m = evaluate(
        model,
        proc,
        shapes_eval_set("test", eval_scenes, model.cfg.vision.image_size),
        progress=True,
    )
    from .cli import format_metrics

    print("\n" + format_metrics(m))
    if ternarize_steps > 0:
        m["ternarized"] = demo_ternarize(
            model_name, Path(out), ternarize_steps, min(eval_scenes or 256, 256)
        )
    print(f"\ndemo finished in {time.time() - t0:.1f} s")
    return m


def weight_bytes(folder: Path) -> int:
    return (folder / "model.safetensors").stat().st_size


def demo_ternarize(model_name: str, out: Path, steps: int, test_scenes: int = 256) -> dict:
    """Short-budget k-means ternary and binary distillation, reported beside the original."""
    import shutil

    from .quant.config import preset
    from .train.ternarize import TernarizeConfig, ternarize

    results = {}
    for name in ("ternvlm", "binary"):
        run = out / f"{name}_run"
        shutil.rmtree(run, ignore_errors=True)  # demo output: always a fresh, comparable run
        cfg = TernarizeConfig(
            steps=steps,
            eval_every=max(steps // 4, 1),
            test_scenes=test_scenes,
            val_scenes=min(64, test_scenes),
            quant=preset(name),
        )
        print(f"\n{cfg.quant.bits} distillation, {steps} steps (k-means init, per-row scales):")
        results[cfg.quant.bits] = ternarize(
            model_name, run, cfg, command=f"ternvlm demo ({steps} steps)"
        )
        results[cfg.quant.bits]["bytes"] = weight_bytes(run / "final")
    orig = next(iter(results.values()))["original"]
    print(f"\n{'model':<10}{'weights file':>14}{'perplexity':>12}{'qa_accuracy':>13}")
    print(
        f"{'original':<10}{weight_bytes(resolve(model_name)) / 1e6:>12.2f}MB"
        f"{orig['perplexity']:>12.4f}{orig['qa_accuracy']:>13.4f}"
    )
    for bits, r in results.items():
        print(
            f"{bits:<10}{r['bytes'] / 1e6:>12.2f}MB{r['perplexity']:>12.4f}{r['qa_accuracy']:>13.4f}"
        )
    print(
        f"(shapes:test, {orig['n_images']} images; {steps} fine-tuning steps is the demo's short "
        "budget: `ternvlm ternarize default --steps 1500` gets closer to the original)"
    )
    for bits, r in results.items():
        variant = "ternary" if bits == "ternary" else "binary"
        r["litert"] = demo_litert(
            out / f"{'ternvlm' if bits == 'ternary' else 'binary'}_run", variant
        )
    return results


def demo_litert(run: Path, variant: str, n_images: int = 3) -> dict:
    """Export a ternarized run to .tflite with our custom ops and generate on LiteRT."""
    try:
        from .export.exporter import ExportConfig, export
        from .export.linear import export_copy
    except ImportError as e:  # pragma: no cover - the export extra is part of make's install
        print(f"(LiteRT export skipped: {e})")
        return {}
    from .runtime.vlm import TfliteVLM

    out = run / f"model_{variant}.tflite"
    print(f"\nexport {run / 'final'} -> {out} (--ops {variant})")
    cfg = ExportConfig(ops=variant)
    info = export(run / "final", out, cfg)
    model, proc = load_checkpoint(run / "final")
    # what the file computes: int8 activations and an int8 embedding/head (info["parts"])
    model = export_copy(model, variant, cfg.act, cfg.head)
    same, total, tokens, seconds = 0, 0, 0, 0.0
    with TfliteVLM(out, threads=2) as tv:
        for i in range(n_images):
            s = shapes.make_sample("test", i, model.cfg.vision.image_size)
            for prompt in (CAPTION_PROMPT, qa_prompt(s.qas[0].question)):
                enc = proc.encode(prompt)
                px = proc.pixels([s.image])
                g = GenerationConfig(max_new_tokens=32)
                t = time.perf_counter()
                ids = tv.generate_ids(enc.ids, px, g)
                seconds += time.perf_counter() - t
                tokens += len(ids)
                same += ids == generate_ids(model, enc.ids, px, g)
                total += 1
                if prompt == CAPTION_PROMPT:
                    print(f"  LiteRT image {i}: {proc.decode(ids)}")
    print(
        f"  {variant}.tflite {info['bytes'] / 1e6:.2f} MB; LiteRT generations equal to PyTorch: "
        f"{same}/{total}; {tokens / max(seconds, 1e-9):.0f} tokens/s end to end (2 threads)"
    )
    print("  parts: " + ", ".join(f"{k} {v}" for k, v in info["parts"].items()))
    return {"file_bytes": info["bytes"], "same_generations": same, "prompts": total}
