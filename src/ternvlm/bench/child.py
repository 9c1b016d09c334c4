"""One measurement of a .tflite in a fresh process; prints one JSON line.

    python -m ternvlm.bench.child model.tflite --threads 1 --prompt 80 --gen 32 --repeats 2

It uses only numpy and our LiteRT driver (no torch), so its resident memory is the runtime's
baseline (reported before the model is loaded) plus what the model costs. Steps, as a user's
app would run them: encode the image, prefill the prompt (image features in the image-token
slots), pick the first token (time to first token ends here), then ``gen`` greedy decode steps
with the KV cache kept in the driver's own decode inputs. Before any timing, a text-only
prefill + decode gives the peak memory of decoding alone ("decode_peak_rss_mb", before the
image encoder's activations exist), then one untimed warm-up round.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import TernvlmError
from .proc import spread, status_mb


def measure(
    path: Path,
    threads: int,
    prompt_tokens: int,
    gen_tokens: int,
    repeats: int = 1,
    image_token_id: int = 3,
) -> dict:
    """Times of encode / prefill / first token / decode, plus RSS before and after loading."""
    import ctypes

    from ..runtime.litert import LiteRtModel, _library, litert_library

    ctypes.CDLL(litert_library())  # the runtime's code belongs to the baseline, not the model
    _library()
    rss_before = status_mb("VmRSS")
    t0 = time.perf_counter()
    m = LiteRtModel(path, threads=threads)
    load_s = time.perf_counter() - t0
    try:
        px = m.input_array("encode_image", "pixel_values")
        ids = m.input_array("prefill", "input_ids")
        feats_in = m.input_array("prefill", "image_features")
        n_img, plen = feats_in.shape[1], ids.shape[1]
        names = [n for n in m.signatures["decode"].inputs if n not in ("token", "pos")]
        cache = {n: m.input_array("decode", n) for n in names}
        cache_len = next(iter(cache.values())).shape[1] if cache else 0  # [1, L, kvh, D]
        if not n_img + 1 <= prompt_tokens <= plen:
            raise TernvlmError(
                f"prompt of {prompt_tokens} tokens must hold the {n_img} image tokens plus one "
                f"and fit the exported prefill length {plen}"
            )
        if prompt_tokens + gen_tokens > cache_len:
            raise TernvlmError(
                f"prompt {prompt_tokens} + {gen_tokens} generated tokens exceed the exported "
                f"KV cache of {cache_len}"
            )
        prompt = np.zeros(plen, np.int32)
        prompt[0] = 1
        prompt[1 : 1 + n_img] = image_token_id
        prompt[1 + n_img : prompt_tokens] = 10 + np.arange(prompt_tokens - 1 - n_img) % 50
        at = prompt_tokens - 1  # the position whose logits give the first token
        if "last" in m.signatures["prefill"].inputs:  # --prefill-logits last: [1, 1, V]
            m.input_array("prefill", "last")[...] = at
            at = 0
        token_in, pos_in = m.input_array("decode", "token"), m.input_array("decode", "pos")
        logits_out = m.output_array("decode", "output_0")
        kv_out = [m.output_array("decode", f"output_{j + 1}") for j in range(len(names))]
        pre_kv = [m.output_array("prefill", f"output_{j + 1}") for j in range(len(names))]
        in_place = plen <= cache_len  # prefill writes its keys/values into the cache itself
        if in_place:
            for j, a in enumerate(cache.values()):
                m.bind("prefill", f"output_{j + 1}", a[:, :plen], output=True)

        def one_round() -> tuple[float, float, float, float]:
            t_start = time.perf_counter()
            m.run("encode_image")
            feats_in[...] = m.output_array("encode_image", "output_0")
            t_enc = time.perf_counter()
            ids[0] = prompt
            m.run("prefill")
            tok = int(np.argmax(m.output_array("prefill", "output_0")[0, at]))
            if not in_place:
                for a, b in zip(cache.values(), pre_kv, strict=True):
                    a[:, :prompt_tokens] = b[:, :prompt_tokens]
            t_first = time.perf_counter()
            for pos in range(prompt_tokens, prompt_tokens + gen_tokens):
                token_in[...] = tok
                pos_in[...] = pos
                m.run("decode")
                tok = int(np.argmax(logits_out[0, -1]))
                for a, b in zip(cache.values(), kv_out, strict=True):
                    a[:, pos : pos + 1] = b
            t_end = time.perf_counter()
            return (
                (t_enc - t_start) * 1e3,
                (t_first - t_enc) * 1e3,
                (t_first - t_start) * 1e3,
                gen_tokens / (t_end - t_first),
            )

        # text-only first (no image encoder run yet): the memory a decoding app needs
        feats_in[...] = 0.0
        ids[0] = prompt
        m.run("prefill")
        for pos in range(prompt_tokens, prompt_tokens + gen_tokens):
            token_in[...] = 7
            pos_in[...] = pos
            m.run("decode")
        decode_hwm = status_mb("VmHWM")
        px[...] = np.random.default_rng(0).uniform(-1, 1, px.shape)
        one_round()  # warm-up: first-run allocations, page faults on the weights
        rounds = [one_round() for _ in range(repeats)]
    finally:
        m.close()
    enc, pre, ttft, tps = (list(x) for x in zip(*rounds, strict=True))
    return {
        "encode_ms": spread(enc),
        "prefill_ms": spread(pre),
        "ttft_ms": spread(ttft),
        "decode_tok_s": spread(tps),
        "load_s": load_s,
        "baseline_rss_mb": rss_before,
        "vm_hwm_mb": status_mb("VmHWM"),
        "decode_peak_rss_mb": decode_hwm,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ternvlm.bench.child", description=__doc__)
    ap.add_argument("model", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, required=True)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--image-token-id", type=int, default=3)
    a = ap.parse_args(argv)
    try:
        r = measure(a.model, a.threads, a.prompt, a.gen, a.repeats, a.image_token_id)
    except TernvlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
