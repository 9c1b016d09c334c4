"""Hugging Face Idefics3 (SmolVLM) checkpoints load onto our VLM and match transformers.

A tiny random ``Idefics3ForConditionalGeneration`` is built and saved locally (no downloads); our
forward and greedy generation must equal transformers' on the same preprocessed pixels.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ternvlm.errors import TernvlmError
from ternvlm.models.checkpoint import load_checkpoint
from ternvlm.models.generate import GenerationConfig, generate, generate_ids
from ternvlm.models.hf_idefics3 import config_from_hf, load_idefics3, our_name
from ternvlm.models.vlm import VLM

transformers = pytest.importorskip("transformers")

IMAGE, PATCH, SCALE = 64, 8, 2  # 8x8 patches -> 16 image tokens after the pixel shuffle
PROMPT = "question: what shape is at the top left? answer:"


def hf_config(vocab: int, tie: bool):
    return transformers.Idefics3Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE,
            patch_size=PATCH,
            layer_norm_eps=1e-5,  # not the default, so the mapping is exercised
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        scale_factor=SCALE,
        image_token_id=3,  # "<image>" of the test tokenizer
        tie_word_embeddings=tie,
    )


def randomize_(model: torch.nn.Module) -> None:
    """Weights far from transformers' tiny init, so a wrong mapping cannot hide in small logits."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


_BUILT: dict[bool, tuple] = {}


def build(tmp_path_factory, tokenizer, tie: bool):
    """(transformers model, folder written by its save_pretrained + our tokenizer.json)."""
    if tie not in _BUILT:
        torch.manual_seed(0)
        hf = transformers.Idefics3ForConditionalGeneration(
            hf_config(tokenizer.get_vocab_size(), tie)
        )
        randomize_(hf)
        hf.eval()
        folder = tmp_path_factory.mktemp(f"idefics3_tie{int(tie)}")
        hf.save_pretrained(folder)
        tokenizer.save(str(folder / "tokenizer.json"))
        _BUILT[tie] = hf, folder
    return _BUILT[tie]


@pytest.fixture(scope="module")
def untied(tmp_path_factory, tokenizer):
    return build(tmp_path_factory, tokenizer, tie=False)


def inputs(proc, seed: int = 0):
    ids = proc.encode(PROMPT).ids
    px = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))
    return ids, px


@pytest.mark.parametrize("tie", [False, True])
def test_logits_and_greedy_generation_match_transformers(tmp_path_factory, tokenizer, tie):
    hf, folder = build(tmp_path_factory, tokenizer, tie)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "idefics3"
    model, proc = load_checkpoint(folder)  # dispatches on config.json's model_type
    c = model.cfg
    assert c.architecture == "idefics3" and c.decoder.tie_embeddings == tie
    assert (c.vision.norm_eps, c.decoder.norm_eps, c.decoder.rope_theta) == (1e-5, 1e-5, 1e5)
    assert c.image_tokens == 16 and c.image_token_id == 3
    # The diff-style config.json (defaults left out) maps like the full transformers config.
    assert config_from_hf(hf.config) == config_from_hf(
        json.loads((folder / "config.json").read_text())
    )

    ids, px = inputs(proc)
    assert ids.count(c.image_token_id) == c.image_tokens
    with torch.no_grad():
        ours = model(torch.tensor([ids]), px)
        # transformers takes pixel_values [batch, n_images, 3, H, W] (images padded with all-zero
        # ones, dropped again) and pixel_attention_mask [batch, n_images, H, W] (True on real
        # pixels; None = all real). One image, no splitting: [1, 1, 3, 64, 64], no mask.
        theirs = hf(input_ids=torch.tensor([ids]), pixel_values=px[:, None]).logits
    diff = (ours - theirs).abs().max().item()
    print(
        f"tie={tie}: max |logits ours - transformers| = {diff:.3g} (logit std {theirs.std():.3g})"
    )
    assert ours.shape == theirs.shape
    assert diff <= 1e-4

    g = GenerationConfig(max_new_tokens=6)
    for seed in range(3):
        ids, px = inputs(proc, seed)
        mine = generate_ids(model, ids, px, g)
        with torch.no_grad():
            out = hf.generate(
                input_ids=torch.tensor([ids]),
                pixel_values=px[:, None],
                max_new_tokens=g.max_new_tokens,
                do_sample=False,
                eos_token_id=c.eos_token_id,
                pad_token_id=c.pad_token_id,
            )
        ref = out[0, len(ids) :].tolist()
        if c.eos_token_id in ref:  # ours stops before eos, transformers keeps it
            ref = ref[: ref.index(c.eos_token_id)]
        assert mine == ref, (seed, mine, ref)


@pytest.mark.parametrize(
    "given",
    [
        {"vision_config": {"patch_size": 16}, "text_config": {"vocab_size": 130000}},
        {"vision_config": {"patch_size": 16}, "image_token_id": 5},
    ],
)
def test_defaults_of_a_sparse_config_json_match_transformers(given):
    """save_pretrained leaves out values equal to the defaults; ours fill them in the same way."""
    full = transformers.Idefics3Config(**given).to_dict()
    assert config_from_hf({"model_type": "idefics3", **given}) == config_from_hf(full)


def test_load_idefics3_runs_our_pipeline(untied):
    _, folder = untied
    model, proc = load_idefics3(folder)
    px = proc.pixels([Image.new("RGB", (80, 50), (200, 30, 30))])
    assert px.shape == (1, 3, IMAGE, IMAGE)
    ids = proc.encode(PROMPT).ids
    assert model(torch.tensor([ids]), px).shape == (1, len(ids), model.cfg.decoder.vocab_size)
    text = generate(model, proc, Image.new("RGB", (80, 50)), PROMPT, GenerationConfig(4))
    assert isinstance(text, str)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(
        TernvlmError, match=r"unsupported .*model_type 'qwen2_vl'.*supported: idefics3"
    ):
        load_checkpoint(tmp_path)
    with pytest.raises(TernvlmError, match="supported: idefics3"):
        config_from_hf({"model_type": "moondream1"})


def test_unsupported_text_model(untied, tmp_path):
    _, folder = untied
    data = json.loads((folder / "config.json").read_text())
    data["text_config"]["model_type"] = "phi"
    with pytest.raises(TernvlmError, match="text_config model_type 'phi'; supported: llama"):
        config_from_hf(data)


def _damaged(folder, tmp_path, edit):
    out = tmp_path / "ck"
    shutil.copytree(folder, out)
    path = out / "model.safetensors"
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path), metadata={"format": "pt"})
    return out


PROJ = "model.connector.modality_projection.proj.weight"
UP = "model.text_model.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda sd: sd.pop(PROJ), f"missing tensors ['{PROJ}']"),
        (lambda sd: sd.pop("lm_head.weight"), "missing tensors ['lm_head.weight']"),
        (
            lambda sd: sd.__setitem__(UP, torch.zeros(3, 64)),
            f"mis-shaped tensors {UP} (3, 64) != (128, 64) expected",
        ),
        (
            lambda sd: sd.__setitem__("model.vision_model.head.weight", torch.zeros(2)),
            "unexpected tensors ['model.vision_model.head.weight']",
        ),
    ],
    ids=["missing", "missing_head", "mis_shaped", "unexpected"],
)
def test_bad_weights_are_named(untied, tmp_path, edit, needle):
    _, folder = untied
    bad = _damaged(folder, tmp_path, edit)
    with pytest.raises(TernvlmError) as exc:
        load_checkpoint(bad)
    msg = str(exc.value)
    assert needle in msg and "does not match its config.json" in msg, msg
    assert len(msg.splitlines()) == 1


def test_hub_id_without_network(no_network):
    with pytest.raises(TernvlmError, match="no network.*local-dir"):
        load_idefics3("HuggingFaceTB/SmolVLM-256M-Instruct")
    with pytest.raises(TernvlmError, match="checkpoint not found"):
        load_idefics3("no/such/local/folder")


def test_vision_positions_follow_transformers_rounding(tokenizer):
    """On a 38x38 patch grid transformers' float32 buckets give row/column 12 position 11."""
    side = 38
    cfg = hf_config(tokenizer.get_vocab_size(), tie=False)
    cfg.vision_config.image_size, cfg.vision_config.patch_size = 2 * side, 2
    cfg.text_config.max_position_embeddings = 512  # room for the 361 image tokens
    torch.manual_seed(0)
    hf = transformers.Idefics3ForConditionalGeneration(cfg)
    randomize_(hf)
    hf.eval()
    model = VLM(config_from_hf(cfg)).eval()
    sd = {our_name(k): v for k, v in hf.state_dict().items() if our_name(k)}
    model.load_state_dict(sd, strict=False)
    assert not torch.equal(model.vision.position_ids, torch.arange(side * side))
    px = torch.randn(1, 3, 2 * side, 2 * side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = model.encode_image(px)[0]
        ref = hf.model.get_image_features(px[:, None]).pooler_output[0]
    assert (mine - ref).abs().max().item() <= 1e-4
