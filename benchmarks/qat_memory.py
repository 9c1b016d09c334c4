"""Peak memory and time of quantization-aware ternarization (QAT) of a SmolVLM-256M-sized model.

    .venv/bin/python benchmarks/qat_memory.py            # the table in docs/RESULTS.md
    .venv/bin/python benchmarks/qat_memory.py --preset tiny --seq-len 32 --steps 2   # smoke test

Random weights with the preset's shapes (ternvlm.bench.presets; 228M parameters for
``smolvlm-256m``), the training code of ``ternvlm ternarize`` (make_student: per-row k-means
ternarization of every Linear layer of the vision encoder, connector and decoder; AdamW; the
KD + CE loss against the float teacher; Accelerate on CPU). One step sees one 512x512 image and
``--seqs`` sequences of ``--seq-len`` tokens (64 image tokens, a 16-token prompt and the rest
target tokens: every target position gets the KD and CE loss). Each configuration runs in a
child process of its own, so its peak RSS (ru_maxrss, and VmHWM) is its own: building the model,
k-means init and the ``--steps`` optimizer steps. Time per step is the mean over the steps after
the first (the first allocates the optimizer state).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CONFIGS = {
    "baseline (fp32 teacher)": dict(teacher_dtype="fp32"),
    "bf16 teacher": dict(teacher_dtype="bf16"),
    "bf16 teacher + grad checkpointing": dict(teacher_dtype="bf16", grad_checkpointing=True),
    "bf16 teacher + grad checkpointing + frozen vision": dict(
        teacher_dtype="bf16", grad_checkpointing=True, freeze_vision=True
    ),
}


def vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def child(name: str, a: argparse.Namespace) -> dict:
    import torch
    from accelerate import Accelerator

    from ternvlm.bench.presets import preset_config
    from ternvlm.data.batching import collate
    from ternvlm.models.processor import Encoded
    from ternvlm.models.vlm import VLM
    from ternvlm.train.ternarize import (
        StudentStep,
        TernarizeConfig,
        distill_step,
        make_optimizer,
        make_student,
        prepare_teacher,
    )

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = preset_config(a.preset)
    t = time.perf_counter()
    teacher = VLM(cfg).eval()
    with torch.no_grad():  # as bench.presets.build_preset: keeps a tied head's logits sane
        teacher.decoder.embed_tokens.weight.normal_(0.0, 0.02)
    t_build = time.perf_counter() - t
    c = TernarizeConfig(threads=a.threads, **CONFIGS[name]).validate()
    t = time.perf_counter()
    student, report = make_student(teacher, c)
    prepare_teacher(teacher, c)
    opt = make_optimizer(student, c)
    t_init = time.perf_counter() - t
    rss_init = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    acc = Accelerator(cpu=True)
    step_mod, opt = acc.prepare(StudentStep(student), opt)
    step_mod.train()

    g = torch.Generator().manual_seed(1)
    n_img, prompt = cfg.image_tokens, 16
    if a.seq_len < 1 + n_img + prompt + 2:
        raise SystemExit(f"--seq-len must be at least {1 + n_img + prompt + 2}")
    v = cfg.decoder.vocab_size
    encoded = []
    for _ in range(a.seqs):
        text = torch.randint(16, v, (a.seq_len - 1 - n_img,), generator=g).tolist()
        encoded.append(Encoded([cfg.bos_token_id] + [cfg.image_token_id] * n_img + text,
                               1 + n_img + prompt))  # fmt: skip
    batches = [collate(encoded, [0] * a.seqs, cfg.pad_token_id)]
    size = cfg.vision.image_size
    pixels = torch.rand(1, 3, size, size, generator=g) * 2 - 1

    times, losses = [], []
    for _ in range(a.steps):
        t = time.perf_counter()
        loss, _, _ = distill_step(teacher, step_mod, student, opt, acc, pixels, batches, c)
        times.append(time.perf_counter() - t)
        losses.append(round(loss.item(), 4))
    params = sum(p.numel() for p in teacher.parameters())
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    opt_bytes = sum(
        s.numel() * s.element_size()
        for st in opt.state.values()
        for s in st.values()
        if torch.is_tensor(s)
    )
    later = times[1:] or times
    return {
        "config": name,
        "params_m": params / 1e6,
        "trainable_m": trainable / 1e6,
        "quant_layers": len(report.layers),
        "teacher_gb": teacher_bytes / 2**30,
        "adam_state_gb": opt_bytes / 2**30,
        "build_s": t_build,
        "init_s": t_init,
        "peak_rss_after_init_gb": rss_init,
        "first_step_s": times[0],
        "step_s": sum(later) / len(later),
        "losses": losses,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "vm_hwm_gb": vm_hwm_kib() / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="smolvlm-256m")
    ap.add_argument("--seqs", type=int, default=2, help="sequences per step (one image)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps after the k-means init")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", default=",".join(str(i) for i in range(len(CONFIGS))))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        print("RESULT " + json.dumps(child(a.child, a)), flush=True)
        return
    names = [list(CONFIGS)[int(i)] for i in a.configs.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    common = ["--preset", a.preset, "--seqs", str(a.seqs), "--seq-len", str(a.seq_len)]
    common += ["--steps", str(a.steps), "--threads", str(a.threads)]
    rows = []
    for name in names:
        t = time.time()
        r = subprocess.run(
            [sys.executable, __file__, *common, "--child", name],
            env=env,
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            sys.exit(f"{name}: exit {r.returncode}\n{r.stderr[-3000:]}")
        row = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[7:])
        row["wall_s"] = time.time() - t
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(
        f"\n{a.preset}: {rows[0]['params_m']:.1f}M parameters, {rows[0]['quant_layers']} "
        f"quantized layers (all parts) or fewer; 1 image x {a.seqs} x {a.seq_len} tokens per "
        f"step; {a.steps} steps; {a.threads} thread(s)\n"
    )
    print(
        "| configuration | trainable params | teacher weights | Adam state | peak RSS "
        "after init | **peak RSS** | k-means init + setup | first step | s / step |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['config']} | {r['trainable_m']:.1f}M | {r['teacher_gb']:.2f} GiB | "
            f"{r['adam_state_gb']:.2f} GiB | {r['peak_rss_after_init_gb']:.2f} GiB | "
            f"**{r['peak_rss_gb']:.2f} GiB** | {r['init_s']:.1f} s | {r['first_step_s']:.1f} s | "
            f"{r['step_s']:.1f} s |"
        )


if __name__ == "__main__":
    main()
