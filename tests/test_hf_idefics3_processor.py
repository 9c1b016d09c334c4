"""SmolVLM (Idefics3) image splitting, prompt expansion and chat template match transformers.

A tiny random ``Idefics3ForConditionalGeneration`` and an ``Idefics3Processor`` (PIL image
processor with max_image_size 64 and longest_edge 128, SmolVLM-Instruct's chat template, a local
byte-level BPE tokenizer with Idefics3's special tokens) are saved in one folder; our loader must
give transformers' pixel_values, input_ids, logits and greedy generation on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ternvlm.config import VLMConfig
from ternvlm.errors import TernvlmError
from ternvlm.models.checkpoint import load_checkpoint, save_checkpoint
from ternvlm.models.generate import GenerationConfig, generate, generate_ids
from ternvlm.models.hf_idefics3 import load_idefics3
from ternvlm.models.hf_idefics3_processor import (
    SmolVLMProcessor,
    read_chat_template,
    render_chat_template,
)
from ternvlm.models.processor import CAPTION_PROMPT, processor_for, qa_prompt

from .test_hf_idefics3 import randomize_

transformers = pytest.importorskip("transformers")

SIDE, PATCH, LONGEST = 64, 8, 128  # 8x8 patches, pixel shuffle 2 -> 16 image tokens per view
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
BOS, EOS, IMAGE_ID, EOU = 1, 2, 3, 6
# HuggingFaceTB/SmolVLM-Instruct's chat template
TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
QUESTION = "What is in the image?"


def make_tokenizer() -> Tokenizer:
    """Byte-level BPE with SmolVLM's special tokens; its post-processor prepends <|im_start|> (the
    bos), so the add-special-tokens rules of transformers' processor are exercised."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = ["User: what is in the image? Assistant: a red circle on the left.\n\n", QUESTION]
    tok.train_from_iterator(text * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", BOS)]
    )
    assert [tok.token_to_id(t) for t in ("<image>", "<end_of_utterance>")] == [IMAGE_ID, EOU]
    return tok


def hf_config(vocab: int):
    return transformers.Idefics3Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=SIDE,
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
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            bos_token_id=BOS,
            eos_token_id=EOS,
            pad_token_id=0,
        ),
        scale_factor=2,
        image_token_id=IMAGE_ID,
        tie_word_embeddings=False,
    )


def hf_processor(tok: Tokenizer, **image_kwargs):
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    image_processor = transformers.Idefics3ImageProcessorPil(
        max_image_size={"longest_edge": SIDE}, size={"longest_edge": LONGEST}, **image_kwargs
    )
    return transformers.Idefics3Processor(
        image_processor, fast, image_seq_len=16, chat_template=TEMPLATE
    )


def image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
    return Image.fromarray(arr, mode)


def chat(n_images: int = 1, text: str = QUESTION) -> list[dict]:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(transformers model, transformers processor, folder with both saved)."""
    tok = make_tokenizer()
    torch.manual_seed(0)
    hf = transformers.Idefics3ForConditionalGeneration(hf_config(tok.get_vocab_size()))
    randomize_(hf)
    hf.eval()
    proc = hf_processor(tok)
    # Make greedy decoding emit <end_of_utterance> within a few tokens: its head row is twice that
    # of the token greedy picks third, so it wins wherever that token would (positive logit).
    inputs = hf_inputs(proc, [image(150, 90)], messages=chat())
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=3, do_sample=False, eos_token_id=EOS)
        third = int(out[0, -1])
        hf.lm_head.weight[EOU] = 2 * hf.lm_head.weight[third]
    hf.generation_config.eos_token_id = [EOS, EOU]
    hf.generation_config.pad_token_id = 0
    folder = tmp_path_factory.mktemp("smolvlm")
    hf.save_pretrained(folder)
    proc.save_pretrained(folder)
    return hf, proc, folder


@pytest.fixture(scope="module")
def ours(smol):
    return load_idefics3(smol[2])


def hf_inputs(proc, images, text=None, messages=None, **kwargs):
    if messages is not None:
        for m in messages:
            it = iter(images)
            m["content"] = [
                {"type": "image", "image": next(it)} if c["type"] == "image" else c
                for c in m["content"]
            ]
        return proc.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs=kwargs,
        )
    return proc(text=text, images=images, return_tensors="pt", **kwargs)


def test_folder_loads_a_smolvlm_processor(smol, ours):
    _, _, folder = smol
    model, proc = ours
    assert isinstance(proc, SmolVLMProcessor) and proc.split and proc.uses_chat()
    assert sorted(p.name for p in folder.glob("*.json*")) == [
        "config.json",
        "generation_config.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    s = model.cfg.processor
    assert s["size"] == {"longest_edge": LONGEST} and s["max_image_size"] == {"longest_edge": SIDE}
    assert s["resample"] == Image.Resampling.LANCZOS  # transformers' Idefics3 filter
    assert s["chat_template"] == TEMPLATE and s["image_seq_len"] == 16
    assert proc.stop_ids == (EOS, EOU)


@pytest.mark.parametrize(
    "size,mode",
    [
        ((150, 90), "RGB"),
        ((90, 150), "RGB"),
        ((20, 12), "RGB"),
        ((64, 64), "RGB"),
        ((99, 33), "RGBA"),
    ],
)
def test_pixels_match_transformers(smol, ours, size, mode):
    _, hf_proc, _ = smol
    _, proc = ours
    im = image(*size, seed=size[0], mode=mode)
    ref = hf_proc.image_processor([im], return_tensors="pt", return_row_col_info=True)
    px, rows, cols = proc.tiles(im)
    assert (rows, cols) == (ref["rows"][0][0], ref["cols"][0][0])
    assert px.shape == ref.pixel_values.shape[1:]
    diff = (px - ref.pixel_values[0]).abs().max().item()
    print(f"{size} {mode}: {rows}x{cols} tiles + global, max |pixels - transformers| = {diff:.3g}")
    assert diff <= 1e-5
    # Without splitting (our pipeline's pixels()): one view, transformers' do_image_splitting=False.
    ref = hf_proc.image_processor([im, im], return_tensors="pt", do_image_splitting=False)
    mine, theirs = proc.pixels([im, im]), ref.pixel_values.reshape(-1, 3, SIDE, SIDE)
    assert mine.shape == theirs.shape == (2, 3, SIDE, SIDE)
    assert (mine - theirs).abs().max().item() <= 1e-5


def test_no_split_below_max_image_size_and_no_resize(smol, ours):
    """longest_edge <= max_image_size: one view even with splitting; do_resize off: tiles of the
    original size."""
    _, hf_proc, _ = smol
    model, _ = ours
    for override in ({"size": {"longest_edge": 48}}, {"do_resize": False}):
        settings = {**model.cfg.processor, **override}
        proc = SmolVLMProcessor(model.cfg, hf_proc.tokenizer.backend_tokenizer, settings)
        im = image(150, 90, seed=3)
        ref = hf_proc.image_processor([im], return_tensors="pt", **override)
        px, rows, cols = proc.tiles(im)
        assert px.shape == ref.pixel_values.shape[1:], override
        assert (px - ref.pixel_values[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("template", [True, False], ids=["chat", "raw"])
def test_prompt_ids_match_transformers(smol, ours, template):
    _, hf_proc, _ = smol
    _, proc = ours
    ims = [image(150, 90, seed=1)]
    if template:
        ref = hf_inputs(hf_proc, ims, messages=chat())
        enc, px = proc.prepare(ims, QUESTION)
        assert proc.tokenizer.decode(enc.ids[:5], skip_special_tokens=False).startswith(
            "<|im_start|>User:<fake_token_around_image><row_1_col_1>"
        )
    else:
        text = "<image>" + QUESTION  # transformers' processor adds the bos here
        ref = hf_inputs(hf_proc, ims, text=text)
        enc, px = proc.prepare(ims, text)
    assert enc.ids == ref.input_ids[0].tolist()
    assert enc.ids.count(IMAGE_ID) == 5 * 16  # 2x2 tiles + global view
    assert (px - ref.pixel_values[0]).abs().max().item() <= 1e-5


def test_two_images_in_one_prompt_and_unsplit(smol, ours):
    _, hf_proc, _ = smol
    _, proc = ours
    ims = [image(150, 90, seed=1), image(40, 120, seed=2)]
    ref = hf_inputs(hf_proc, ims, messages=chat(2))
    enc, px = proc.prepare(ims, QUESTION)
    assert enc.ids == ref.input_ids[0].tolist()
    assert (px - ref.pixel_values[0]).abs().max().item() <= 1e-5
    text = "<image>left<image>right"
    ref = hf_inputs(hf_proc, ims, text=text, do_image_splitting=False)
    proc.split = False
    try:
        enc, px = proc.prepare(ims, text)
    finally:
        proc.split = True
    assert enc.ids == ref.input_ids[0].tolist() and px.shape == (2, 3, SIDE, SIDE)
    assert (px - ref.pixel_values[0]).abs().max().item() <= 1e-5
    with pytest.raises(TernvlmError, match="2 <image> tokens for 1 images"):
        proc.prepare(ims[:1], text)


def test_pipeline_api_is_the_unsplit_layout(smol, ours):
    """encode + pixels (training/eval) = transformers with do_image_splitting=False, chat template
    on; a target ends with <end_of_utterance>."""
    _, hf_proc, _ = smol
    _, proc = ours
    im = image(150, 90, seed=4)
    ref = hf_inputs(hf_proc, [im], messages=chat(text="what?"), do_image_splitting=False)
    enc = proc.encode(qa_prompt("what?"), "a red circle")  # the question is the user's message
    assert enc.ids[: enc.target_start] == ref.input_ids[0].tolist()
    assert enc.ids[-1] == EOU and enc.ids.count(IMAGE_ID) == 16
    assert proc.tokenizer.decode(enc.ids[enc.target_start :]) == " a red circle"
    caption = proc.tokenizer.decode(proc.encode(CAPTION_PROMPT).ids, skip_special_tokens=True)
    assert caption == "User:Can you describe this image?\nAssistant:"
    assert (proc.pixels([im]) - ref.pixel_values[0]).abs().max().item() <= 1e-5


def test_logits_match_transformers_on_tiles(smol, ours):
    hf, hf_proc, _ = smol
    model, proc = ours
    ims = [image(150, 90, seed=5)]
    ref = hf_inputs(hf_proc, ims, messages=chat())
    enc, px = proc.prepare(ims, QUESTION)
    assert px.shape == (5, 3, SIDE, SIDE)
    with torch.no_grad():
        mine = model(torch.tensor([enc.ids]), px)
        theirs = hf(**ref).logits
    diff = (mine - theirs).abs().max().item()
    print(f"5 views: max |logits ours - transformers| = {diff:.3g} (std {theirs.std():.3g})")
    assert mine.shape == theirs.shape and diff <= 1e-4


def test_greedy_generation_stops_at_end_of_utterance(smol, ours):
    hf, hf_proc, _ = smol
    model, proc = ours
    im = image(150, 90)  # the image the fixture tuned the head on
    ref = hf_inputs(hf_proc, [im], messages=chat())
    with torch.no_grad():
        out = hf.generate(**ref, max_new_tokens=8, do_sample=False)  # generation_config's eos
    theirs = out[0, ref.input_ids.shape[1] :].tolist()
    assert theirs[-1] == EOU and EOS not in theirs, theirs
    enc, px = proc.prepare([im], QUESTION)
    g = GenerationConfig(max_new_tokens=8, stop_ids=proc.stop_ids)
    assert generate_ids(model, enc.ids, px, g) == theirs[:-1]
    assert generate_ids(model, enc.ids, px, g, use_cache=False) == theirs[:-1]
    text = generate(model, proc, im, QUESTION, GenerationConfig(max_new_tokens=8))
    assert text == proc.decode(theirs[:-1])
    # Without the stop id generation runs on past it.
    assert len(generate_ids(model, enc.ids, px, GenerationConfig(max_new_tokens=8))) == 8


def test_settings_survive_save_and_reload(ours, tmp_path):
    model, proc = ours
    data = json.loads(json.dumps(model.cfg.to_dict()))
    assert VLMConfig.from_dict(data) == model.cfg
    save_checkpoint(tmp_path / "ck", model, proc.tokenizer)
    model2, proc2 = load_checkpoint(tmp_path / "ck")
    assert isinstance(proc2, SmolVLMProcessor) and model2.cfg.processor == model.cfg.processor
    im = image(150, 90, seed=6)
    (e1, p1), (e2, p2) = proc.prepare([im], QUESTION), proc2.prepare([im], QUESTION)
    assert e1.ids == e2.ids and torch.equal(p1, p2) and proc2.stop_ids == proc.stop_ids
    # A config without processor settings (saved before they existed) keeps the plain layout.
    plain = VLMConfig.from_dict({k: v for k, v in data.items() if k != "processor"})
    assert type(processor_for(plain, proc.tokenizer)).__name__ == "Processor"
    assert "processor" not in plain.to_dict()


def test_tflite_refuses_more_image_views_than_exported(ours):
    from ternvlm.runtime.vlm import TfliteVLM

    model, proc = ours
    tv = TfliteVLM.__new__(TfliteVLM)  # the checks run before any LiteRT call
    tv.path, tv.cfg, tv.prefill_len, tv.last_logits_only = Path("m.tflite"), model.cfg, 512, False
    tv._run = lambda *a, **k: pytest.fail("must not run")
    enc, px = proc.prepare([image(150, 90)], QUESTION)
    feats = model.encode_image(px).detach().numpy()
    with pytest.raises(TernvlmError, match="one image view of 16 image tokens.*80 image-token"):
        tv.prefill(enc.ids, feats)
    with pytest.raises(TernvlmError, match="takes one image view per prompt"):
        tv(torch.tensor([enc.ids]), image_features=torch.from_numpy(feats))


def test_chat_template_sources(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "tok"}))
    assert read_chat_template(tmp_path) == "tok"
    (tmp_path / "chat_template.jinja").write_text("jinja")
    assert read_chat_template(tmp_path) == "jinja"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "legacy"}))
    assert read_chat_template(tmp_path) == "legacy"
    (tmp_path / "processor_config.json").write_text(json.dumps({"chat_template": "proc"}))
    assert read_chat_template(tmp_path) == "proc"
    text = render_chat_template(TEMPLATE, chat(), add_generation_prompt=True)
    assert text == "<|im_start|>User:<image>What is in the image?<end_of_utterance>\nAssistant:"
    with pytest.raises(TernvlmError, match="chat template error: no"):
        render_chat_template("{{ raise_exception('no') }}", [])


def test_our_eval_pipeline_runs_unsplit(ours):
    """``ternvlm eval``/``ternarize`` (encode + pixels, one view per image) on the shapes data."""
    from ternvlm.data.registry import shapes_eval_set
    from ternvlm.eval.evaluate import evaluate

    model, proc = ours
    data = shapes_eval_set("val", 2, SIDE)
    result = evaluate(model, proc, data, mismatched=False)
    assert result["n_images"] == 2 and np.isfinite(result["perplexity"])
