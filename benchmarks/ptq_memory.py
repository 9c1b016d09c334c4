"""Time and peak memory of post-training k-means ternarization of a SmolVLM-256M-sized model.

    /usr/bin/time -v .venv/bin/python benchmarks/ptq_memory.py

Random weights with the preset's shapes (ternvlm.bench.presets): 283 Linear layers of the
vision encoder, connector and decoder, per-row k-means, the recipe of ``ternvlm ternarize``.
"""

import resource
import time

import torch

from ternvlm.bench.presets import preset_config
from ternvlm.models.vlm import VLM
from ternvlm.quant.api import quantize_
from ternvlm.quant.config import preset

torch.set_num_threads(2)
torch.manual_seed(0)
t = time.time()
m = VLM(preset_config("smolvlm-256m")).eval()
t_build = time.time() - t
n = sum(p.numel() for p in m.parameters())
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.time()
with torch.no_grad():
    rep = quantize_(m, preset("ternvlm"))
dt = time.time() - t
print(
    f"params {n / 1e6:.1f}M build {t_build:.1f}s peak_rss_before {rss0:.0f} MiB; k-means PTQ {len(rep.layers)} layers {dt:.1f}s (init report {rep.seconds:.1f}s, max iters {rep.max_iterations}, mean rel err {rep.mean_rel_error:.3f}); peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
)
