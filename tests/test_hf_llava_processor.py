"""LLaVA prompts match transformers' ``LlavaProcessor``: chat template + image token expansion.

The tiny random LLaVA folders of ``test_hf_llava`` get a transformers ``LlavaProcessor`` saved
into them (PIL CLIP/SigLIP image processor, llava-1.5-hf's chat template, the local tokenizer with
a post-processor that prepends ``<bos>`` as Llama's does); our ids must equal the processor's
``input_ids`` for ``apply_chat_template``'s text and our logits transformers' on them.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, processors

from ternvlm.config import VLMConfig
from ternvlm.errors import TernvlmError
from ternvlm.models.checkpoint import load_checkpoint, save_checkpoint
from ternvlm.models.generate import GenerationConfig, generate_ids
from ternvlm.models.hf_llava import load_llava
from ternvlm.models.hf_llava_processor import LlavaProcessor
from ternvlm.models.processor import CAPTION_PROMPT, Processor, processor_for, qa_prompt

from .test_hf_llava import EXPECTED, IMAGE, PATCH, build

transformers = pytest.importorskip("transformers")

BOS, EOS, IMAGE_ID = 1, 2, 3
# llava-hf/llava-1.5-7b-hf's chat template (chat_template.json)
TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QUESTION = "what shape is at the top left?"
# case -> num_additional_image_tokens of its processor (CLIP's class token; SigLIP has none)
EXTRA = {"clip": 1, "clip_full": 1, "siglip_default": 0}


def bos_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """The shared test tokenizer (``<image>`` = 3) with Llama's ``<bos> $A`` post-processor."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", BOS)]
    )
    return tok


def hf_processor(
    tok: Tokenizer, case: str, template: str | None = TEMPLATE, image_kwargs=None, **kwargs
):
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    square, image_kwargs = {"height": IMAGE, "width": IMAGE}, image_kwargs or {}
    if case.startswith("siglip"):
        images = transformers.SiglipImageProcessorPil(size=square, **image_kwargs)
    else:
        images = transformers.CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE}, crop_size=square, **image_kwargs
        )
    options = dict(
        patch_size=PATCH,
        vision_feature_select_strategy="full" if case == "clip_full" else "default",
        num_additional_image_tokens=EXTRA[case],
        chat_template=template,
    )
    return transformers.LlavaProcessor(images, fast, **{**options, **kwargs})


def with_processor(tmp_path_factory, tokenizer, case: str, template: str | None = TEMPLATE, **kw):
    """(transformers model, its processor, a copy of the model folder with the processor saved)."""
    hf, folder = build(tmp_path_factory, tokenizer, case)
    proc = hf_processor(bos_tokenizer(tokenizer), case, template, **kw)
    out = tmp_path_factory.mktemp(f"llava_proc_{case}")
    shutil.copytree(folder, out, dirs_exist_ok=True)
    proc.save_pretrained(out)
    return hf, proc, out


_LOADED: dict[str, tuple] = {}


def loaded(tmp_path_factory, tokenizer, case: str):
    """(transformers model, transformers processor, folder, our model, our processor)."""
    if case not in _LOADED:
        hf, proc, folder = with_processor(tmp_path_factory, tokenizer, case)
        _LOADED[case] = (hf, proc, folder, *load_checkpoint(folder))
    return _LOADED[case]


def image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def chat(images: list[Image.Image], text: str = QUESTION) -> list[dict]:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def hf_inputs(proc, images, text: str = QUESTION):
    """transformers' processor on apply_chat_template's text (how LLaVA model cards call it)."""
    prompt = proc.apply_chat_template(chat(images, text), add_generation_prompt=True)
    return proc(text=prompt, images=images, return_tensors="pt")


@pytest.mark.parametrize("case", list(EXTRA))
def test_ids_and_logits_match_transformers(tmp_path_factory, tokenizer, case):
    hf, hf_proc, folder, model, proc = loaded(tmp_path_factory, tokenizer, case)
    n = EXPECTED[case][0]  # image tokens of the model
    assert isinstance(proc, LlavaProcessor) and proc.uses_chat()
    s = model.cfg.processor
    assert (s["kind"], s["image_token"], s["image_seq_length"]) == ("llava", "<image>", n)
    assert s["chat_template"] == TEMPLATE and s["special_tokens"]["bos_token"] == "<bos>"
    ims = [image(80, 50, seed=1)]
    ref = hf_inputs(hf_proc, ims)
    # Our qa_prompt layout is the user's message; the template gives "USER: <image>\nq ASSISTANT:".
    for prompt in (QUESTION, qa_prompt(QUESTION)):
        enc, px = proc.prepare(ims, prompt)
        assert enc.ids == ref.input_ids[0].tolist()
        assert enc.target_start == len(enc.ids)
    assert enc.ids[0] == BOS and enc.ids.count(IMAGE_ID) == n
    text = proc.tokenizer.decode(enc.ids, skip_special_tokens=False)
    assert text == "<bos>USER: " + "<image>" * n + f"\n{QUESTION} ASSISTANT:"
    pixel_diff = (px - ref.pixel_values).abs().max().item()
    assert pixel_diff <= 1e-5
    with torch.no_grad():
        mine = model(torch.tensor([enc.ids]), ref.pixel_values)
        theirs = hf(**ref).logits
    diff = (mine - theirs).abs().max().item()
    print(f"{case}: {n} image tokens, max |logits ours - transformers| = {diff:.3g}")
    assert mine.shape == theirs.shape and diff <= 1e-4
    # Greedy generation continues the same way (stops at generation_config's eos).
    g = GenerationConfig(max_new_tokens=5, stop_ids=proc.stop_ids)
    with torch.no_grad():
        out = hf.generate(**ref, max_new_tokens=5, do_sample=False, eos_token_id=EOS)
    ref_new = out[0, ref.input_ids.shape[1] :].tolist()
    ref_new = ref_new[: ref_new.index(EOS)] if EOS in ref_new else ref_new
    assert generate_ids(model, enc.ids, ref.pixel_values, g) == ref_new


def test_target_two_images_and_raw_prompts(tmp_path_factory, tokenizer):
    hf, hf_proc, _, model, proc = loaded(tmp_path_factory, tokenizer, "clip")
    ims = [image(80, 50, seed=2), image(40, 70, seed=3)]
    # A training target follows "ASSISTANT:" as " target<eos>".
    enc = proc.encode(qa_prompt(QUESTION), "a red circle")
    assert enc.ids[: enc.target_start] == hf_inputs(hf_proc, ims[:1]).input_ids[0].tolist()
    assert enc.ids[-1] == EOS
    assert proc.tokenizer.decode(enc.ids[enc.target_start : -1]) == " a red circle"
    caption = proc.tokenizer.decode(proc.encode(CAPTION_PROMPT).ids, skip_special_tokens=True)
    assert caption == "USER: \nCan you describe this image? ASSISTANT:"
    # Two images in one prompt: both expanded, pixels [2, 3, H, W]; logits still match.
    ref = hf_inputs(hf_proc, ims)
    enc, px = proc.prepare(ims, QUESTION)
    assert enc.ids == ref.input_ids[0].tolist() and px.shape == (2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        diff = (model(torch.tensor([enc.ids]), px) - hf(**ref).logits).abs().max().item()
    assert diff <= 1e-4
    # A prompt holding <image> is used as given (transformers' processor on that text).
    raw = "<image>\nUSER: describe it ASSISTANT:"
    ref = hf_proc(text=raw, images=ims[:1], return_tensors="pt")
    assert proc.encode(raw).ids == ref.input_ids[0].tolist()
    with pytest.raises(TernvlmError, match="1 <image> tokens for 2 images"):
        proc.prepare(ims, raw)
    # Chat off: the plain layout.
    proc.chat = False
    try:
        assert (
            proc.encode(QUESTION).ids == Processor(model.cfg, proc.tokenizer).encode(QUESTION).ids
        )
    finally:
        proc.chat = True


def test_settings_survive_save_and_reload(tmp_path_factory, tokenizer, tmp_path):
    _, _, _, model, proc = loaded(tmp_path_factory, tokenizer, "clip")
    data = json.loads(json.dumps(model.cfg.to_dict()))
    assert VLMConfig.from_dict(data) == model.cfg
    save_checkpoint(tmp_path / "ck", model, proc.tokenizer)
    model2, proc2 = load_checkpoint(tmp_path / "ck")
    assert isinstance(proc2, LlavaProcessor) and model2.cfg.processor == model.cfg.processor
    im = image(80, 50, seed=4)
    (e1, p1), (e2, p2) = proc.prepare([im], QUESTION), proc2.prepare([im], QUESTION)
    assert e1.ids == e2.ids and torch.equal(p1, p2) and proc2.stop_ids == proc.stop_ids
    # A config without processor settings keeps the plain layout.
    plain = VLMConfig.from_dict({k: v for k, v in data.items() if k != "processor"})
    assert type(processor_for(plain, proc.tokenizer)) is Processor


def test_folder_without_template_keeps_the_plain_layout(tmp_path_factory, tokenizer):
    _, folder = build(tmp_path_factory, tokenizer, "clip")  # no processor saved at all
    _, hf_proc, folder2 = with_processor(
        tmp_path_factory,
        tokenizer,
        "clip",
        template=None,
        image_kwargs={"image_mean": (0.4, 0.5, 0.6)},
    )
    assert not (folder2 / "chat_template.jinja").exists()
    assert not (folder2 / "preprocessor_config.json").exists()  # nested in processor_config.json
    for f in (folder, folder2):
        model, proc = load_llava(f)
        assert type(proc) is Processor and model.cfg.processor is None
        ids = proc.encode(QUESTION).ids
        n = model.cfg.image_tokens
        assert ids[: n + 1] == [BOS] + [IMAGE_ID] * n
        assert ids[n + 1 :] == proc.tokens(QUESTION)
    # processor_config.json's nested image processor is read (transformers 5's save layout).
    assert model.cfg.vision.image_mean == (0.4, 0.5, 0.6)
    im = image(80, 50, seed=5)
    ref = hf_proc.image_processor(images=im, return_tensors="pt").pixel_values
    assert (proc.pixels([im]) - ref).abs().max().item() <= 1e-5


def test_image_token_count_that_differs_from_the_model_is_named(tmp_path_factory, tokenizer):
    # CLIP "default" without the class token counted: 16 - 1 = 15 tokens for 16 features.
    _, _, folder = with_processor(
        tmp_path_factory, tokenizer, "clip", num_additional_image_tokens=0
    )
    with pytest.raises(TernvlmError, match="expands <image> into 15 tokens.*model gives 16"):
        load_llava(folder)
