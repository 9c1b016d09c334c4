"""Hugging Face LLaVA checkpoints (CLIP or SigLIP tower) load onto our VLM and match transformers.

Tiny random ``LlavaForConditionalGeneration`` models are built and saved locally (no downloads);
our forward and greedy generation must equal transformers' on the same pixels and prompt, and our
image preprocessing must equal transformers' PIL image processors.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ternvlm.config import ConnectorConfig, VisionConfig, VLMConfig
from ternvlm.errors import TernvlmError
from ternvlm.models.checkpoint import load_checkpoint
from ternvlm.models.generate import GenerationConfig, generate, generate_ids
from ternvlm.models.hf_llava import config_from_hf, load_llava

transformers = pytest.importorskip("transformers")

IMAGE, PATCH = 32, 8  # 4x4 = 16 patches
PROMPT = "question: what shape is at the top left? answer:"

# name -> (tower, vision_feature_select_strategy, vision_feature_layer, tie, other LlavaConfig args)
CASES = {
    "clip": ("clip_vision_model", "default", -2, False, {}),
    "clip_full": ("clip_vision_model", "full", -1, False, {"multimodal_projector_bias": False}),
    "siglip": (
        "siglip_vision_model",
        "full",
        1,
        True,
        {"projector_hidden_act": "gelu_pytorch_tanh"},
    ),
    "siglip_default": ("siglip_vision_model", "default", -2, False, {}),
}
# image tokens and vision blocks run: CLIP drops its class token ("default") or keeps it ("full");
# SigLIP has none, and "default" drops its first patch as transformers does.
EXPECTED = {"clip": (16, 2), "clip_full": (17, 3), "siglip": (16, 1), "siglip_default": (15, 2)}


def hf_config(vocab: int, case: str):
    tower, strategy, layer, tie, extra = CASES[case]
    return transformers.LlavaConfig(
        vision_config=dict(
            model_type=tower,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=IMAGE,
            patch_size=PATCH,
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
        image_token_index=3,  # "<image>" of the test tokenizer
        vision_feature_select_strategy=strategy,
        vision_feature_layer=layer,
        tie_word_embeddings=tie,
        **extra,
    )


def randomize_(model: torch.nn.Module) -> None:
    """Weights far from transformers' tiny init, so a wrong mapping cannot hide in small logits."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bias") or name.endswith("class_embedding"):
                p.copy_(0.1 * noise)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


_BUILT: dict[str, tuple] = {}


def build(tmp_path_factory, tokenizer, case: str):
    """(transformers model, folder written by its save_pretrained + our tokenizer.json)."""
    if case not in _BUILT:
        torch.manual_seed(0)
        hf = transformers.LlavaForConditionalGeneration(hf_config(tokenizer.get_vocab_size(), case))
        randomize_(hf)
        hf.eval()
        folder = tmp_path_factory.mktemp(f"llava_{case}")
        hf.save_pretrained(folder)
        tokenizer.save(str(folder / "tokenizer.json"))
        _BUILT[case] = hf, folder
    return _BUILT[case]


@pytest.fixture(scope="module")
def clip(tmp_path_factory, tokenizer):
    return build(tmp_path_factory, tokenizer, "clip")


def inputs(proc, seed: int = 0):
    ids = proc.encode(PROMPT).ids
    px = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))
    return ids, px


def max_logit_diff(model, hf, ids, px) -> float:
    with torch.no_grad():
        ours = model(torch.tensor([ids]), px)
        theirs = hf(input_ids=torch.tensor([ids]), pixel_values=px).logits
    assert ours.shape == theirs.shape
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_generation_match_transformers(tmp_path_factory, tokenizer, case):
    hf, folder = build(tmp_path_factory, tokenizer, case)
    data = json.loads((folder / "config.json").read_text())
    assert data["model_type"] == "llava"
    model, proc = load_checkpoint(folder)  # dispatches on config.json's model_type
    c = model.cfg
    tower, strategy, _, tie, _ = CASES[case]
    assert c.architecture == "llava" and c.decoder.tie_embeddings == tie
    assert (c.image_tokens, c.vision.layers) == EXPECTED[case]
    assert c.vision.class_token == (tower == "clip_vision_model") and not c.vision.post_norm
    assert (c.decoder.norm_eps, c.decoder.rope_theta, c.image_token_id) == (1e-5, 1e5, 3)
    # The diff-style config.json (defaults left out) maps like the full transformers config.
    assert config_from_hf(hf.config) == config_from_hf(data)

    ids, px = inputs(proc)
    assert ids.count(c.image_token_id) == c.image_tokens
    diff = max_logit_diff(model, hf, ids, px)
    print(f"{case}: max |logits ours - transformers| = {diff:.3g}")
    assert diff <= 1e-4

    g = GenerationConfig(max_new_tokens=6)
    for seed in range(3):
        ids, px = inputs(proc, seed)
        mine = generate_ids(model, ids, px, g)
        with torch.no_grad():
            out = hf.generate(
                input_ids=torch.tensor([ids]),
                pixel_values=px,
                max_new_tokens=g.max_new_tokens,
                do_sample=False,
                eos_token_id=c.eos_token_id,
                pad_token_id=c.pad_token_id,
            )
        ref = out[0, len(ids) :].tolist()
        if c.eos_token_id in ref:  # ours stops before eos, transformers keeps it
            ref = ref[: ref.index(c.eos_token_id)]
        assert mine == ref, (seed, mine, ref)


# LLaVA-1.5: CLIP ViT-L/14-336 tower (LlavaConfig's default), llama with the image token added.
LLAVA_15 = {"text_config": {"vocab_size": 32064}}


@pytest.mark.parametrize(
    "given",
    [
        LLAVA_15,
        {
            "vision_config": {
                "model_type": "siglip_vision_model",
                "image_size": 378,
                "patch_size": 14,
            },
            "text_config": {"vocab_size": 32064},
            "vision_feature_select_strategy": "full",
        },
        {
            "vision_config": {"hidden_size": 1152},
            "image_token_index": 5,
            "vision_feature_layer": -1,
        },
        {"text_config": {"vocab_size": 100, "tie_word_embeddings": True}, "image_token_index": 9},
    ],
)
def test_defaults_of_a_sparse_config_json_match_transformers(given):
    """save_pretrained leaves out values equal to the defaults; ours fill them in the same way."""
    full = transformers.LlavaConfig(**given).to_dict()
    assert config_from_hf({"model_type": "llava", **given}) == config_from_hf(full)


def test_llava_15_shapes():
    c = config_from_hf({"model_type": "llava", **LLAVA_15})
    v = c.vision
    assert (v.image_size, v.patch_size, v.hidden, v.layers, v.act) == (
        336,
        14,
        1024,
        23,
        "quick_gelu",
    )
    assert c.image_tokens == 576 and c.connector.scale_factor == 1 and c.connector.gelu == "erf"


def _with_processor(folder, tmp_path, processor):
    out = tmp_path / "ck"
    shutil.copytree(folder, out)
    processor.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["clip", "llava_pad", "siglip"])
def test_pixels_match_transformers_image_processors(clip, tmp_path, kind):
    """Our resize/crop/pad + rescale + normalise equal transformers' PIL image processors."""
    edge, square = {"shortest_edge": IMAGE}, {"height": IMAGE, "width": IMAGE}
    processor = {
        "clip": lambda: transformers.CLIPImageProcessorPil(size=edge, crop_size=square),
        "llava_pad": lambda: transformers.LlavaImageProcessorPil(
            size=edge, crop_size=square, do_pad=True, image_mean=(0.4, 0.5, 0.6)
        ),
        "siglip": lambda: transformers.SiglipImageProcessorPil(size=square),
    }[kind]()
    _, proc = load_llava(_with_processor(clip[1], tmp_path, processor))
    assert proc.cfg.vision.resize == {"clip": "crop", "llava_pad": "pad", "siglip": "stretch"}[kind]
    rng = np.random.default_rng(0)
    for w, h in [(80, 50), (50, 81), (40, 40)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = torch.as_tensor(np.asarray(processor(images=im, return_tensors="np")["pixel_values"]))
        assert (proc.pixels([im]) - ref).abs().max().item() <= 1e-5, (kind, w, h)


def test_unsupported_preprocessing_is_named(clip, tmp_path):
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 40}, crop_size={"height": IMAGE, "width": IMAGE}
    )
    with pytest.raises(TernvlmError, match="does not give the vision tower's 32x32 input"):
        load_llava(_with_processor(clip[1], tmp_path, processor))


def test_load_llava_runs_our_pipeline(clip):
    _, folder = clip
    model, proc = load_llava(folder)
    px = proc.pixels([Image.new("RGB", (80, 50), (200, 30, 30))])
    assert px.shape == (1, 3, IMAGE, IMAGE)
    text = generate(model, proc, Image.new("RGB", (80, 50)), PROMPT, GenerationConfig(4))
    assert isinstance(text, str)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(TernvlmError, match=r"model_type 'qwen2_vl'; supported: .*llava"):
        load_checkpoint(tmp_path)
    with pytest.raises(TernvlmError, match="model_type 'idefics3'; supported: llava"):
        config_from_hf({"model_type": "idefics3"})


def _edited_config(folder, tmp_path, edit):
    out = tmp_path / "ck"
    shutil.copytree(folder, out)
    data = json.loads((out / "config.json").read_text())
    edit(data)
    (out / "config.json").write_text(json.dumps(data))
    return out


def test_unsupported_vision_tower_is_named(clip, tmp_path):
    bad = _edited_config(
        clip[1], tmp_path, lambda d: d["vision_config"].update(model_type="dinov2")
    )
    with pytest.raises(
        TernvlmError,
        match="vision tower: vision_config model_type 'dinov2'; "
        "supported: clip_vision_model, siglip_vision_model",
    ):
        load_checkpoint(bad)


@pytest.mark.parametrize(
    "edit,needle",
    [
        (
            lambda d: d["text_config"].update(model_type="qwen2"),
            "text_config model_type 'qwen2'; supported: llama",
        ),
        (lambda d: d.update(vision_feature_layer=[-2, -5]), "vision_feature_layer [-2, -5]"),
        (lambda d: d.update(vision_feature_layer=-5), "not a hidden state of a 3-layer"),
        (
            lambda d: d.update(vision_feature_select_strategy="cls"),
            "vision_feature_select_strategy 'cls'",
        ),
        (lambda d: d.update(projector_hidden_act="relu"), "projector_hidden_act 'relu'"),
        (
            lambda d: d["vision_config"].update(image_size=36),
            "image_size 36 is not a multiple of patch_size 8",
        ),
        (lambda d: d.update(quantization_config={"quant_method": "bitsandbytes"}), "quantized"),
    ],
    ids=[
        "text",
        "layer_list",
        "layer_range",
        "strategy",
        "projector_act",
        "image_size",
        "quantized",
    ],
)
def test_unsupported_configs_are_named(clip, edit, needle):
    data = json.loads((clip[1] / "config.json").read_text())
    edit(data)
    with pytest.raises(TernvlmError) as exc:
        config_from_hf(data)
    assert needle in str(exc.value)


def _damaged(folder, tmp_path, edit):
    out = tmp_path / "ck"
    shutil.copytree(folder, out)
    path = out / "model.safetensors"
    sd = load_file(str(path))
    new = edit(sd)  # edits sd in place, or returns a new dict
    save_file(new if isinstance(new, dict) else sd, str(path), metadata={"format": "pt"})
    return out


PROJ = "multi_modal_projector.linear_1.weight"
UP = "language_model.model.layers.1.mlp.up_proj.weight"
CLS = "vision_tower.embeddings.class_embedding"


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda sd: sd.pop(PROJ), f"missing tensors ['{PROJ}']"),
        (lambda sd: sd.pop(CLS), f"missing tensors ['{CLS}']"),
        (
            lambda sd: sd.pop("language_model.lm_head.weight"),
            "missing tensors ['language_model.lm_head.weight']",
        ),
        (
            lambda sd: sd.__setitem__(UP, torch.zeros(3, 64)),
            f"mis-shaped tensors {UP} (3, 64) != (128, 64) expected",
        ),
        (
            lambda sd: sd.__setitem__("vision_tower.head.weight", torch.zeros(2)),
            "unexpected tensors ['vision_tower.head.weight']",  # CLIP has no pooling head
        ),
    ],
    ids=["missing", "missing_class_embedding", "missing_head", "mis_shaped", "unexpected"],
)
def test_bad_weights_are_named(clip, tmp_path, edit, needle):
    _, folder = clip
    bad = _damaged(folder, tmp_path, edit)
    with pytest.raises(TernvlmError) as exc:
        load_checkpoint(bad)
    msg = str(exc.value)
    assert needle in msg and "does not match its config.json" in msg, msg
    assert len(msg.splitlines()) == 1


def _hub_layout(sd):
    """transformers 4 Hub files (llava-hf/*): the tower has a ``vision_model.`` level."""
    return {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in sd.items()}


def _memory_layout(sd):
    """Names as transformers 5 holds them, plus buffers older versions saved."""
    out = {}
    for k, v in sd.items():
        if k.startswith("language_model.model."):
            k = "model.language_model." + k[len("language_model.model.") :]
        elif k.startswith("language_model.lm_head."):
            k = k[len("language_model.") :]
        else:
            k = "model." + k
        out[k] = v
    out["model.vision_tower.embeddings.position_ids"] = torch.arange(17)[None]
    out["model.language_model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    return out


@pytest.mark.parametrize("layout", [_hub_layout, _memory_layout], ids=["hub", "memory"])
def test_other_save_layouts_load(clip, tmp_path, layout):
    hf, folder = clip
    model, proc = load_checkpoint(_damaged(folder, tmp_path, layout))
    assert max_logit_diff(model, hf, *inputs(proc)) <= 1e-4


def test_errors_name_tensors_as_the_file_does(clip, tmp_path):
    pre = "vision_tower.vision_model.pre_layrnorm.weight"
    bad = _damaged(clip[1], tmp_path, lambda sd: _hub_layout(sd) | {pre: torch.zeros(5)})
    with pytest.raises(TernvlmError, match=rf"mis-shaped tensors {pre} \(5,\) != \(32,\)"):
        load_checkpoint(bad)


def test_hub_id_without_network(no_network):
    with pytest.raises(TernvlmError, match="no network.*local-dir"):
        load_llava("llava-hf/llava-1.5-7b-hf")
    with pytest.raises(TernvlmError, match="checkpoint not found"):
        load_llava("no/such/local/folder")


def test_vision_options_default_to_siglip_and_are_validated():
    v = VisionConfig()
    assert v.num_tokens == v.num_patches and v.post_norm and not v.class_token
    ok = VLMConfig(vision=VisionConfig(class_token=True, drop_first_token=True))
    assert ok.validate().image_tokens == VLMConfig().image_tokens  # class token dropped again
    for bad, needle in [
        (dict(vision=VisionConfig(class_token=True)), "connector.scale_factor must be 1"),
        (dict(vision=VisionConfig(act="relu")), "vision.act must be one of"),
        (dict(vision=VisionConfig(resize="fill")), "vision.resize must be one of"),
        (dict(vision=VisionConfig(stem="conv", patch_bias=False)), "patch_bias"),
        (
            dict(
                vision=VisionConfig(class_token=True, position_buckets=True),
                connector=ConnectorConfig(scale_factor=1),
            ),
            "position_buckets",
        ),
    ]:
        with pytest.raises(TernvlmError, match=needle):
            VLMConfig(**bad).validate()
    # Round trip through our own config.json keeps the options.
    cfg = config_from_hf({"model_type": "llava", **LLAVA_15})
    assert VLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
