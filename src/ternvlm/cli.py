"""The ``ternvlm`` command line: demo, pretrain, ternarize, eval, generate.

User errors print one line ``ternvlm: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .errors import TernvlmError

_HUB = "; Hub ids: owner/name[@revision] (SmolVLM, LLaVA, Moondream2 2024-05-08)"


def _add_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="pre-train the default VLM from scratch on the shapes world"
    )
    p.add_argument("--out", required=True, help="output folder (checkpoint/, final/, log.jsonl)")
    p.add_argument("--steps", type=int, default=3600)
    p.add_argument("--batch-images", type=int, default=32)
    p.add_argument("--seqs-per-image", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument(
        "--no-resume", action="store_true", help="start over even if out/checkpoint exists"
    )


def cmd_pretrain(a: argparse.Namespace) -> int:
    from .train.pretrain import PretrainConfig, default_model_config, pretrain

    c = PretrainConfig(
        steps=a.steps,
        batch_images=a.batch_images,
        seqs_per_image=a.seqs_per_image,
        lr=a.lr,
        seed=a.seed,
        threads=a.threads,
        eval_every=a.eval_every,
        model=default_model_config(512),
    )
    command = "ternvlm " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    metrics = pretrain(a.out, c, resume=not a.no_resume, command=command)
    print(json.dumps(metrics, indent=2))
    return 0


def _add_ternarize(sub) -> None:
    p = sub.add_parser(
        "ternarize", help="distil a pre-trained VLM into a ternary or binary one (QAT + KD)"
    )
    p.add_argument(
        "model", help="'default', a float checkpoint folder or a Hugging Face Hub id" + _HUB
    )
    p.add_argument("--out", required=True, help="output folder (checkpoint/, final/, log.csv)")
    p.add_argument("--preset", default=None, help="seed (the paper's recipe), ternvlm or binary")
    p.add_argument("--bits", default=None, choices=["ternary", "binary"])
    p.add_argument("--init", default=None, help="kmeans, optimal, absmean, twn or random")
    p.add_argument("--granularity", default=None, help="tensor, row or group:G")
    p.add_argument("--parts", default=None, help="comma list of vision,connector,decoder")
    p.add_argument("--scale", default=None, choices=["learned", "recompute"])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate of the latent weights")
    p.add_argument("--float-lr", type=float, default=2e-4, help="scales, norms, embeddings")
    p.add_argument("--batch-images", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--ce-weight", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--val-scenes", type=int, default=64)
    p.add_argument("--test-scenes", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-workers", type=int, default=1)
    p.add_argument(
        "--data",
        default="shapes",
        help="distillation data: shapes, or imagefolder:DIR (your images + metadata.jsonl)",
    )
    p.add_argument("--resume", action="store_true", help="continue out/checkpoint")
    p.add_argument(
        "--teacher-dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="frozen teacher's stored weights (bf16: half their memory, still computes in fp32)",
    )
    p.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute the student's blocks in the backward pass (less memory, ~1/3 more time)",
    )
    p.add_argument(
        "--freeze-vision",
        action="store_true",
        help="keep the student's vision encoder frozen in float (not quantized)",
    )
    p.add_argument(
        "--freeze-connector",
        action="store_true",
        help="keep the student's connector frozen in float (not quantized)",
    )


def quant_config_from_args(a: argparse.Namespace):
    from .quant.config import QuantConfig, preset

    over = {
        k: v
        for k, v in {
            "bits": a.bits,
            "init": a.init,
            "granularity": a.granularity,
            "scale": a.scale,
            "parts": tuple(a.parts.split(",")) if a.parts else None,
        }.items()
        if v is not None
    }
    if a.preset:
        return preset(a.preset, **over)
    return QuantConfig(**over).validate()


def cmd_ternarize(a: argparse.Namespace) -> int:
    from .train.ternarize import TernarizeConfig, ternarize

    if a.steps < 1:
        raise TernvlmError("--steps must be at least 1")
    parts = a.parts.split(",") if a.parts else []
    for on, part in ((a.freeze_vision, "vision"), (a.freeze_connector, "connector")):
        if on and part in parts:
            raise TernvlmError(
                f"--parts {a.parts} quantizes the {part}, which --freeze-{part} keeps float"
            )
    c = TernarizeConfig(
        steps=a.steps,
        lr=a.lr,
        float_lr=a.float_lr,
        batch_images=a.batch_images,
        temperature=a.temperature,
        kd_weight=a.kd_weight,
        ce_weight=a.ce_weight,
        seed=a.seed,
        eval_every=a.eval_every,
        val_scenes=a.val_scenes,
        test_scenes=a.test_scenes,
        threads=a.threads,
        data_workers=a.data_workers,
        quant=quant_config_from_args(a),
        teacher_dtype=a.teacher_dtype,
        grad_checkpointing=a.grad_checkpointing,
        freeze_vision=a.freeze_vision,
        freeze_connector=a.freeze_connector,
        data=a.data,
    ).validate()
    command = "ternvlm " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    metrics = ternarize(a.model, a.out, c, resume=a.resume, command=command)
    if metrics:
        print(json.dumps(metrics, indent=2))
    return 0


def _add_experiment(sub) -> None:
    p = sub.add_parser("experiment", help="reproducible experiments (inits)")
    p.add_argument("name", choices=["inits"], help="inits: steps to recover perplexity per init")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="default")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--bits", default="ternary,binary")
    p.add_argument("--inits", default="kmeans,absmean,twn,random")
    p.add_argument("--granularity", default="row")
    p.add_argument("--batch-images", type=int, default=16)
    p.add_argument("--val-scenes", type=int, default=64)
    p.add_argument("--test-scenes", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-control", action="store_true", help="skip the float control run")
    p.add_argument("--seeds", default="1", help="comma list; several give an aggregate table")
    p.add_argument("--warmup", type=int, default=20, help="linear lr warm-up steps")


def cmd_experiment(a: argparse.Namespace) -> int:
    from .experiments.inits import InitExperimentConfig, run_inits
    from .train.ternarize import TernarizeConfig

    dense = (1, 2, 3, 4, 6, 8, 10, 12, 15, 20, 30, 40, 60, 80)  # targets are often hit early
    early = tuple(s for s in dense if s < a.steps)
    c = InitExperimentConfig(
        model=a.model,
        bits=tuple(a.bits.split(",")),
        inits=tuple(a.inits.split(",")),
        granularity=a.granularity,
        control=not a.no_control,
        seeds=tuple(int(x) for x in a.seeds.split(",")),
        train=TernarizeConfig(
            warmup=a.warmup,
            steps=a.steps,
            eval_every=a.eval_every,
            eval_early=early,
            batch_images=a.batch_images,
            val_scenes=a.val_scenes,
            test_scenes=a.test_scenes,
            threads=a.threads,
        ),
    )
    run_inits(a.out, c)
    return 0


def _add_backend(p) -> None:
    p.add_argument(
        "--backend",
        choices=["litert", "interpreter"],
        default="litert",
        help=".tflite only: our LiteRT C API driver with custom ops, or the stock Interpreter "
        "(files without custom ops: fp32, int8, ternary-builtin)",
    )


def load_model(name: str, threads: int, backend: str):
    """(model, processor) from a checkpoint, or a LiteRT-backed model from a .tflite."""
    if str(name).endswith(".tflite"):
        from .runtime.vlm import TfliteVLM

        m = TfliteVLM(name, threads=threads, backend=backend)
        return m, m.processor
    from .models.checkpoint import load_checkpoint

    return load_checkpoint(name)


def _add_export(sub) -> None:
    from .export.linear import ACTS, HEADS, VARIANTS

    p = sub.add_parser("export", help="write a model as one .tflite for LiteRT")
    p.add_argument(
        "model", help="'default' or a checkpoint folder (ternary/binary or float)" + _HUB
    )
    p.add_argument("--out", required=True, help="FILE.tflite")
    p.add_argument("--ops", default="ternary", choices=list(VARIANTS))
    p.add_argument("--prefill-len", type=int, default=0, help="prompt slots (0: the context)")
    p.add_argument("--cache-len", type=int, default=0, help="KV cache slots (0: the context)")
    p.add_argument(
        "--act", default="int8", choices=list(ACTS), help="activations of the packed matmuls"
    )
    p.add_argument(
        "--head",
        default="auto",
        choices=list(HEADS),
        help="token embedding / LM head storage (auto: int8 beside packed layers)",
    )
    p.add_argument(
        "--prefill-logits",
        default="all",
        choices=["all", "last"],
        help="prefill returns every position's logits (perplexity) or the last one (smaller)",
    )


def cmd_export(a: argparse.Namespace) -> int:
    from .export.exporter import ExportConfig, export

    ec = ExportConfig(a.ops, a.prefill_len, a.cache_len, a.act, a.head, a.prefill_logits)
    info = export(a.model, a.out, ec)
    print(json.dumps(info, indent=2))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and QA accuracy of a model on a data set")
    p.add_argument("model", help="'default', a checkpoint folder or an exported .tflite" + _HUB)
    _add_backend(p)
    p.add_argument(
        "--data", default="shapes:test", help="shapes:train|val|test or imagefolder:PATH"
    )
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--threads", type=int, default=2)


def cmd_eval(a: argparse.Namespace) -> int:
    import torch

    from .data.registry import load_eval_set
    from .eval.evaluate import evaluate

    torch.set_num_threads(a.threads)
    model, proc = load_model(a.model, a.threads, a.backend)
    data = load_eval_set(a.data, a.limit, model.cfg.vision.image_size)
    m = evaluate(model, proc, data, progress=not a.json)
    if a.json:
        print(json.dumps(m))
    else:
        print(format_metrics(m))
    return 0


def format_metrics(m: dict) -> str:
    lines = [
        f"data                        {m['data']} ({m['n_images']} images, {m['n_examples']} texts)"
    ]
    for k in (
        "perplexity",
        "perplexity_mismatched_image",
        "perplexity_content",
        "perplexity_content_mismatched_image",
        "qa_accuracy",
        "qa_accuracy_novel",
    ):
        if k in m:
            lines.append(f"{k:<36}{m[k]:.4f}")
    for k, v in m.get("qa_accuracy_by_type", {}).items():
        lines.append(f"  accuracy[{k}]{'':<{24 - len(k)}}{v:.4f}")
    return "\n".join(lines)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="answer a question or caption an image")
    p.add_argument("model", help="'default', a checkpoint folder or an exported .tflite" + _HUB)
    _add_backend(p)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--image", required=True, help="PNG or JPEG of any size and mode")
    p.add_argument(
        "--prompt",
        default="caption:",
        help="a question (wrapped as 'question: ... answer:'), or a raw prompt ending with ':'",
    )
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)


def as_prompt(text: str) -> str:
    """Questions become the model's QA layout; anything ending with ':' is used as is."""
    from .models.processor import qa_prompt

    text = text.strip()
    if not text:
        raise TernvlmError("empty prompt")
    return text if text.endswith(":") else qa_prompt(text)


def cmd_generate(a: argparse.Namespace) -> int:
    from .data.images import load_image
    from .models.generate import GenerationConfig, generate

    if a.max_new_tokens < 1:
        raise TernvlmError("--max-new-tokens must be at least 1")
    if a.temperature < 0 or a.top_k < 0:
        raise TernvlmError("--temperature and --top-k must not be negative")
    image = load_image(a.image)
    model, proc = load_model(a.model, a.threads, a.backend)
    g = GenerationConfig(a.max_new_tokens, a.temperature, a.top_k, a.seed)
    print(generate(model, proc, image, as_prompt(a.prompt), g))
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="caption and question generated images with the default model")
    p.add_argument("--model", default="default")
    p.add_argument("--out", default="demo_out", help="folder for the picture gallery")
    p.add_argument("--ternarize-steps", type=int, default=60, help="distillation budget (0: skip)")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--eval-scenes", type=int, default=None, help="test scenes (default: all)")


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(a.model, a.out, a.images, a.ternarize_steps, a.eval_scenes)
    return 0


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _add_bench(sub) -> None:
    from .bench.run import VARIANTS

    p = sub.add_parser(
        "bench",
        help="memory, time to first token, decode speed, perplexity of every variant, one run",
    )
    p.add_argument("model", nargs="?", default="default", help="trained float checkpoint" + _HUB)
    p.add_argument("--preset", default=None, help="smolvlm-256m | smolvlm-500m: random weights")
    p.add_argument("--ternary", default=None, help="trained ternary checkpoint (else k-means PTQ)")
    p.add_argument("--binary", default=None, help="trained binary checkpoint (else k-means PTQ)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    p.add_argument("--threads", type=_ints, default=(1, 2), help="e.g. 1,2")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--gen", type=int, default=32, help="generated tokens per round")
    p.add_argument("--text-tokens", type=int, default=16, help="prompt text after the image")
    p.add_argument("--head", default="int8", choices=["fp32", "int8", "int4"])
    p.add_argument(
        "--act",
        default="int8",
        choices=["int8", "f32", "int7"],
        help="activations of the packed matmuls (ternary-lut always runs int7)",
    )
    p.add_argument("--peer", default=None, choices=["llama.cpp"])
    p.add_argument("--eval-scenes", type=int, default=128, help="0: no perplexity / QA")
    p.add_argument("--out", default="bench_out")
    p.add_argument(
        "--quick", action="store_true", help="tiny preset, 1 round, 4 tokens: checks the pipeline"
    )


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench.report import write_report
    from .bench.run import BenchConfig, run_bench

    c = BenchConfig(
        model=a.model,
        preset=a.preset,
        ternary=a.ternary,
        binary=a.binary,
        variants=tuple(v for v in a.variants.split(",") if v),
        threads=a.threads,
        repeats=a.repeats,
        text_tokens=a.text_tokens,
        gen_tokens=a.gen,
        head=a.head,
        act=a.act,
        peer=a.peer,
        eval_scenes=a.eval_scenes,
        out=a.out,
    )
    if a.quick:
        c.preset, c.repeats, c.gen_tokens, c.text_tokens = "tiny", 1, 4, 4
    result = run_bench(c, command="ternvlm " + shlex.join(sys.argv[1:]))
    paths = write_report(result, Path(a.out))
    print(paths["md"].read_text())
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ternvlm", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_demo(sub)
    _add_pretrain(sub)
    _add_ternarize(sub)
    _add_experiment(sub)
    _add_export(sub)
    _add_eval(sub)
    _add_generate(sub)
    _add_bench(sub)
    return ap


COMMANDS = {
    "demo": cmd_demo,
    "pretrain": cmd_pretrain,
    "ternarize": cmd_ternarize,
    "experiment": cmd_experiment,
    "export": cmd_export,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "bench": cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd](args)
    except TernvlmError as exc:
        print(f"ternvlm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ternvlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
