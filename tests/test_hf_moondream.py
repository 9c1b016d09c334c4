"""Moondream2 checkpoints load onto our VLM and match a reference written from the architecture.

A tiny random checkpoint is written in Moondream2's own layout (vikhyatk/moondream2 revision
2024-05-08: config.json with model_type "moondream1", float16 model.safetensors with its tensor
names, tokenizer.json). The reference below re-implements that revision's forward with plain torch
ops (patchify, ViT blocks with fused qkv, tanh-GELU projector, Phi-1.5 parallel blocks with
partial rotary, LayerNorm + biased LM head) and Moondream's prompt embedding (BOS, image, text);
it shares no code with ternvlm's model.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from ternvlm.errors import TernvlmError
from ternvlm.models.checkpoint import load_checkpoint
from ternvlm.models.generate import GenerationConfig, generate, generate_ids
from ternvlm.models.hf_moondream import (
    MoondreamProcessor,
    config_from_moondream,
    load_moondream,
    moondream_prompt,
)
from ternvlm.models.processor import CAPTION_PROMPT, qa_prompt

# Vision: 42 px, 7 px patches -> 6 x 6 = 36 image tokens; 16 heads as in Moondream's code.
IMAGE, PATCH, VDIM, VLAYERS, VMLP, VHEADS = 42, 7, 64, 2, 80, 16
PROJ = 96  # projector inner width (8192 = 4 x 2048 in Moondream2), != text width on purpose
VOCAB, DIM, LAYERS, HEADS, MLP = 520, 64, 2, 4, 128  # tokenizer has 512 tokens: 519 is unused
THETA, PARTIAL, EPS = 500.0, 0.5, 1e-5
QUESTION = "what shape is at the top left?"

V = "vision_encoder.encoder.model.visual."
P = "vision_encoder.projection.mlp."
T = "text_model.transformer."
H = "text_model.lm_head."

TEXT_CONFIG = {
    "model_type": "phi",
    "vocab_size": VOCAB,
    "hidden_size": DIM,
    "intermediate_size": MLP,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "max_position_embeddings": 256,
    "rope_theta": THETA,
    "partial_rotary_factor": PARTIAL,
    "hidden_act": "gelu_new",
    "layer_norm_eps": EPS,
}
CONFIG = {
    "architectures": ["Moondream"],
    "model_type": "moondream1",
    "text_config": TEXT_CONFIG,
    "torch_dtype": "float16",
    "transformers_version": "4.38.2",
}


def linear(prefix: str, n_out: int, n_in: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "weight": (n_out, n_in), prefix + "bias": (n_out,)}


def norm(prefix: str, n: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "weight": (n,), prefix + "bias": (n,)}


def moondream_shapes(proj_in: int = VDIM) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of Moondream2 (2024-05-08 layout) at this test's sizes."""
    s = {V + "pos_embed": (1, (IMAGE // PATCH) ** 2, VDIM)}
    s |= linear(V + "patch_embed.linear.", VDIM, 3 * PATCH * PATCH)
    for i in range(VLAYERS):
        b = f"{V}blocks.{i}."
        s |= norm(b + "norm1.", VDIM) | norm(b + "norm2.", VDIM)
        s |= linear(b + "attn.qkv.", 3 * VDIM, VDIM) | linear(b + "attn.proj.", VDIM, VDIM)
        s |= linear(b + "mlp.fc1.", VMLP, VDIM) | linear(b + "mlp.fc2.", VDIM, VMLP)
    s |= norm(V + "norm.", VDIM)
    s |= linear(P + "fc1.", PROJ, proj_in) | linear(P + "fc2.", DIM, PROJ)
    s[T + "embd.wte.weight"] = (VOCAB, DIM)
    for i in range(LAYERS):
        b = f"{T}h.{i}."
        s |= norm(b + "ln.", DIM)
        s |= linear(b + "mixer.Wqkv.", 3 * DIM, DIM) | linear(b + "mixer.out_proj.", DIM, DIM)
        s |= linear(b + "mlp.fc1.", MLP, DIM) | linear(b + "mlp.fc2.", DIM, MLP)
    s |= norm(H + "ln.", DIM) | linear(H + "linear.", VOCAB, DIM)
    return s


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """float16 like the Hub file; far from zero so a wrong mapping cannot hide in small logits."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if name.endswith("bias"):
            t = 0.1 * noise
        elif ".ln." in name or ".norm" in name:
            t = 1.0 + 0.1 * noise
        elif name.endswith(("pos_embed", "wte.weight")):
            t = noise
        else:
            t = 2.0 * noise / math.sqrt(shape[-1])  # gain 2: tanh vs erf GELU shows in logits
        out[name] = t.half()
    return out


def write_checkpoint(folder, tokenizer, config=CONFIG, weights=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    sd = weights if weights is not None else random_weights(moondream_shapes())
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(folder / "tokenizer.json"))
    # Moondream2's BOS and EOS are the same token (<|endoftext|>); here "<eos>" plays it.
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<eos>"}, "eos_token": "<eos>"})
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("moondream2")
    write_checkpoint(folder, tokenizer)
    return folder


# ----------------------------------------------------------------------------------------------
# Reference: the published architecture with plain torch ops.


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def lin(w: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return x @ w[prefix + "weight"].T + w[prefix + "bias"]


def ln(w: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], w[prefix + "weight"], w[prefix + "bias"], EPS)


def attention(q, k, v, causal: bool) -> torch.Tensor:
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        t = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
    return scores.softmax(-1) @ v


def ref_image_embeds(w: dict, pixels: torch.Tensor) -> torch.Tensor:
    """vision_encoder.py: LinearPatchEmbedding, VisionTransformer, VisionProjection."""
    b, c, hh, ww = pixels.shape
    h, wd = hh // PATCH, ww // PATCH
    x = pixels.reshape(b, c, h, PATCH, wd, PATCH).permute(0, 2, 4, 1, 3, 5)
    x = lin(w, V + "patch_embed.linear.", x.reshape(b, h * wd, c * PATCH * PATCH))
    x = x + w[V + "pos_embed"]
    n, hd = x.shape[1], VDIM // VHEADS
    for i in range(VLAYERS):
        blk = f"{V}blocks.{i}."
        qkv = lin(w, blk + "attn.qkv.", ln(w, blk + "norm1.", x))
        q, k, v = qkv.reshape(b, n, 3, VHEADS, hd).permute(2, 0, 3, 1, 4)
        a = attention(q, k, v, causal=False).transpose(1, 2).reshape(b, n, VDIM)
        x = x + lin(w, blk + "attn.proj.", a)
        y = ln(w, blk + "norm2.", x)
        x = x + lin(w, blk + "mlp.fc2.", gelu_tanh(lin(w, blk + "mlp.fc1.", y)))
    x = ln(w, V + "norm.", x)
    return lin(w, P + "fc2.", gelu_tanh(lin(w, P + "fc1.", x)))


def ref_logits(w: dict, embeds: torch.Tensor) -> torch.Tensor:
    """modeling_phi.py PhiForCausalLM on inputs_embeds [1, T, DIM] (no cache)."""
    t, hd = embeds.shape[1], DIM // HEADS
    rot = int(PARTIAL * hd)
    inv = 1.0 / THETA ** (torch.arange(0, rot, 2).float() / rot)
    freqs = torch.outer(torch.arange(t).float(), inv)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def rope(x: torch.Tensor) -> torch.Tensor:
        xr, xp = x[..., :rot], x[..., rot:]
        half = torch.cat([-xr[..., rot // 2 :], xr[..., : rot // 2]], -1)
        return torch.cat([xr * cos + half * sin, xp], -1)

    x = embeds
    for i in range(LAYERS):
        blk = f"{T}h.{i}."
        y = ln(w, blk + "ln.", x)
        q, k, v = (
            z.reshape(1, t, HEADS, hd).transpose(1, 2)
            for z in lin(w, blk + "mixer.Wqkv.", y).chunk(3, -1)
        )
        a = attention(rope(q), rope(k), v, causal=True).transpose(1, 2).reshape(1, t, DIM)
        m = lin(w, blk + "mlp.fc2.", gelu_tanh(lin(w, blk + "mlp.fc1.", y)))
        x = x + lin(w, blk + "mixer.out_proj.", a) + m
    return lin(w, H + "linear.", ln(w, H + "ln.", x))


def ref_prompt_embeds(w, tokenizer, image_embeds, question: str) -> torch.Tensor:
    """moondream.py input_embeds for answer_question's "<image>\\n\\nQuestion: q\\n\\nAnswer:"."""
    wte = w[T + "embd.wte.weight"]
    bos = tokenizer.token_to_id("<eos>")
    after = tokenizer.encode(f"\n\nQuestion: {question}\n\nAnswer:", add_special_tokens=False).ids
    return torch.cat([wte[[bos]][None], image_embeds, wte[after][None]], 1)


def ref_greedy(w, embeds: torch.Tensor, eos: int, steps: int) -> list[int]:
    out: list[int] = []
    for _ in range(steps):
        nxt = int(ref_logits(w, embeds)[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        embeds = torch.cat([embeds, w[T + "embd.wte.weight"][[nxt]][None]], 1)
    return out


def ref_pixels(image: Image.Image) -> torch.Tensor:
    """vision_encoder.py preprocess: bicubic resize, ToDtype(scale=True), Normalize(0.5, 0.5)."""
    im = image.convert("RGB").resize((IMAGE, IMAGE), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - 0.5) / 0.5)[None]


def weights_of(folder) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}


# ----------------------------------------------------------------------------------------------


def test_logits_and_greedy_generation_match_the_reference(checkpoint, tokenizer):
    model, proc = load_checkpoint(checkpoint)  # dispatches on config.json's model_type
    assert isinstance(proc, MoondreamProcessor)
    c = model.cfg
    assert c.architecture == "moondream2" and c.image_tokens == (IMAGE // PATCH) ** 2
    assert c.image_token_id == VOCAB - 1 and c.bos_token_id == c.eos_token_id == 2
    assert (c.vision.heads, c.connector.mlp_hidden, c.decoder.rope_theta) == (VHEADS, PROJ, THETA)
    w = weights_of(checkpoint)

    ids = proc.encode(QUESTION).ids
    after = tokenizer.encode(moondream_prompt(QUESTION), add_special_tokens=False).ids
    assert ids == [2] + [VOCAB - 1] * c.image_tokens + after

    image = Image.new("RGB", (70, 50), (200, 30, 30))
    px = proc.pixels([image])
    assert torch.allclose(px, ref_pixels(image), atol=1e-6)

    diffs = []
    for seed in range(2):
        px = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ours = model(torch.tensor([ids]), px)
            img = ref_image_embeds(w, px)
            theirs = ref_logits(w, ref_prompt_embeds(w, tokenizer, img, QUESTION))
            feat_diff = (model.encode_image(px) - img).abs().max().item()
        diff = (ours - theirs).abs().max().item()
        diffs.append(diff)
        print(
            f"seed {seed}: max |image embeds ours - reference| = {feat_diff:.3g}, "
            f"max |logits ours - reference| = {diff:.3g} (logit std {theirs.std():.3g})"
        )
        assert ours.shape == theirs.shape == (1, len(ids), VOCAB)
        assert feat_diff <= 1e-4 and diff <= 1e-4

    g = GenerationConfig(max_new_tokens=8)
    for seed in range(3):
        px = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(10 + seed))
        mine = generate_ids(model, ids, px, g)
        mine_nocache = generate_ids(model, ids, px, g, use_cache=False)
        with torch.no_grad():
            embeds = ref_prompt_embeds(w, tokenizer, ref_image_embeds(w, px), QUESTION)
            ref = ref_greedy(w, embeds, c.eos_token_id, g.max_new_tokens)
        assert mine == mine_nocache == ref, (seed, mine, mine_nocache, ref)
        assert len(ref) > 0


def test_prompts_follow_moondreams_template(checkpoint):
    _, proc = load_moondream(checkpoint)
    templated = proc.encode(moondream_prompt(QUESTION)).ids
    assert proc.encode(QUESTION).ids == templated
    assert proc.encode(qa_prompt(QUESTION)).ids == templated  # the toolkit's QA prompt
    assert proc.encode(CAPTION_PROMPT).ids == proc.encode("Describe this image.").ids
    enc = proc.encode(QUESTION, "a red square")
    assert enc.ids[: enc.target_start] == templated
    assert enc.ids[-1] == proc.cfg.eos_token_id


def test_pipeline_runs_on_an_image(checkpoint):
    model, proc = load_moondream(checkpoint)
    text = generate(model, proc, Image.new("RGB", (80, 50)), QUESTION, GenerationConfig(4))
    assert isinstance(text, str)


def test_published_sizes_without_shapes():
    """config.json alone (as on the Hub: text_config mostly defaults) -> Moondream2's sizes."""
    cfg = config_from_moondream({"model_type": "moondream1", "text_config": {"model_type": "phi"}})
    v, c, d = cfg.vision, cfg.connector, cfg.decoder
    assert (v.image_size, v.patch_size, v.hidden, v.layers, v.heads, v.mlp, v.norm_eps) == (
        378,
        14,
        1152,
        27,
        16,
        4304,
        1e-5,
    )
    assert cfg.image_tokens == 729 and (c.kind, c.scale_factor, c.mlp_hidden, c.gelu) == (
        "mlp",
        1,
        8192,
        "tanh",
    )
    assert (d.vocab_size, d.hidden, d.layers, d.heads, d.kv_heads, d.mlp) == (
        51200,
        2048,
        24,
        32,
        32,
        8192,
    )
    assert d.head_dim == 64 and int(d.head_dim * d.partial_rotary) == 32
    assert d.parallel_block and d.lm_head_bias and not d.tie_embeddings
    assert cfg.image_token_id == 51199
    # Revision 2024-04-02 names the text config phi_config.
    shapes = moondream_shapes()
    old = config_from_moondream({"model_type": "moondream1", "phi_config": TEXT_CONFIG}, shapes)
    assert old == config_from_moondream(CONFIG, shapes)


def _copy(folder, tmp_path, edit_weights=None, edit_config=None):
    out = tmp_path / "ck"
    shutil.copytree(folder, out)
    if edit_weights is not None:
        sd = load_file(str(out / "model.safetensors"))
        edit_weights(sd)
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    if edit_config is not None:
        data = json.loads((out / "config.json").read_text())
        edit_config(data)
        (out / "config.json").write_text(json.dumps(data))
    return out


FC2 = T + "h.1.mlp.fc2.weight"
WQKV = T + "h.0.mixer.Wqkv.weight"
EXTRA = T + "h.2.ln.weight"


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda sd: sd.pop(FC2), f"missing tensors ['{FC2}']"),
        (
            lambda sd: sd.__setitem__(WQKV, torch.zeros(3 * DIM - 3, DIM)),
            f"mis-shaped tensors {WQKV} ({3 * DIM - 3}, {DIM}) != ({3 * DIM}, {DIM}) expected",
        ),
        (lambda sd: sd.__setitem__(EXTRA, torch.zeros(DIM)), f"unexpected tensors ['{EXTRA}']"),
    ],
    ids=["missing", "mis_shaped", "unexpected"],
)
def test_bad_weights_are_named(checkpoint, tmp_path, edit, needle):
    bad = _copy(checkpoint, tmp_path, edit_weights=edit)
    with pytest.raises(TernvlmError) as exc:
        load_checkpoint(bad)
    msg = str(exc.value)
    assert needle in msg and "does not match its config.json" in msg, msg
    assert len(msg.splitlines()) == 1


def test_crop_revisions_are_refused(checkpoint, tmp_path):
    """2024-05-20 .. 2024-08-26: projector input = global + crop features (2 x vision width)."""
    bad = _copy(
        checkpoint,
        tmp_path,
        edit_weights=lambda sd: sd.__setitem__(P + "fc1.weight", torch.zeros(PROJ, 2 * VDIM)),
    )
    with pytest.raises(TernvlmError, match="image crops are not supported.*--revision 2024-05-08"):
        load_checkpoint(bad)


def test_2025_layout_is_refused(tmp_path, tokenizer):
    config = {"architectures": ["HfMoondream"], "model_type": "moondream1", "config": {}}
    write_checkpoint(
        tmp_path / "new", tokenizer, config, {"model.vision.patch_emb.weight": torch.zeros(2, 2)}
    )
    with pytest.raises(TernvlmError, match="revisions 2025-01-09 and later"):
        load_checkpoint(tmp_path / "new")


@pytest.mark.parametrize(
    "edit,needle",
    [
        (
            lambda d: d.__setitem__("model_type", "qwen2_vl"),
            "unsupported Hugging Face model_type 'qwen2_vl'; supported: idefics3, ",
        ),
        (
            lambda d: d["text_config"].__setitem__("model_type", "llama"),
            "text_config model_type 'llama'; supported: phi",
        ),
        (lambda d: d["text_config"].__setitem__("hidden_act", "gelu"), "hidden_act 'gelu'"),
        (lambda d: d["text_config"].__setitem__("qk_layernorm", True), "qk_layernorm"),
        (
            lambda d: d["text_config"].__setitem__("num_key_value_heads", 2),
            "num_key_value_heads 2 != num_attention_heads 4",
        ),
    ],
    ids=["model_type", "text_model", "act", "qk_layernorm", "gqa"],
)
def test_unsupported_configs(checkpoint, tmp_path, edit, needle):
    bad = _copy(checkpoint, tmp_path, edit_config=edit)
    with pytest.raises(TernvlmError, match="unsupported") as exc:
        load_checkpoint(bad)
    msg = str(exc.value)
    assert needle in msg and len(msg.splitlines()) == 1, msg
    if "qwen2_vl" in needle:
        assert "moondream1" in msg, msg
    with pytest.raises(TernvlmError, match="supported: moondream1"):
        config_from_moondream({"model_type": "idefics3"})


def test_hub_id_without_network(no_network):
    with pytest.raises(TernvlmError, match="no network.*local-dir.*--revision 2024-05-08"):
        load_moondream("vikhyatk/moondream2")
    with pytest.raises(TernvlmError, match="checkpoint not found"):
        load_moondream("no/such/local/folder")
