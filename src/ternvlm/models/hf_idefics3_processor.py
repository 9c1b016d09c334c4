"""SmolVLM (Idefics3) preprocessing as transformers' ``Idefics3Processor`` does it, without
transformers at run time.

Followed: transformers 5.24 ``models/idefics3/image_processing_pil_idefics3.py`` (the PIL/numpy
image processor; the default one when torchvision is absent) and ``processing_idefics3.py``.

Images (:meth:`SmolVLMProcessor.tiles`), all resizes with the PIL filter ``resample`` (LANCZOS, 1,
for every SmolVLM), on uint8 RGB images (alpha composited on white):

1. ``do_resize``: the longest edge to ``size["longest_edge"]``, aspect kept, the other edge
   truncated then rounded up to even (small images are enlarged), both kept <= 4096;
2. ``do_image_splitting``: resized again so both edges are multiples of
   ``m = max_image_size["longest_edge"]``; when larger than m x m it is cut into rows x cols tiles
   of m x m (row-major), followed by the global view: that image resized to m x m. Without
   splitting (or when it is m x m already) one view: the image resized to m x m;
3. ``x * rescale_factor`` (in float64, then float32), ``(x - mean) / std`` in float32.

The views are what the vision encoder sees, in order: one image split into K tiles is
``pixel_values`` [K+1, 3, m, m] for one prompt (transformers: [1, K+1, 3, m, m] plus an all-ones
``pixel_attention_mask``). ``m`` must equal the vision config's ``image_size``.

Text (:meth:`SmolVLMProcessor.encode`): each ``<image>`` of the prompt becomes, for a split image,
``<fake_token_around_image><row_{r}_col_{c}>`` + ``<image>`` x image_seq_len per tile, ``\\n`` after
each row, then ``\\n<fake_token_around_image><global-img>`` + ``<image>`` x image_seq_len +
``<fake_token_around_image>``; an unsplit image is ``<fake_token_around_image><global-img>`` +
``<image>`` x image_seq_len + ``<fake_token_around_image>``. The expanded text is tokenized as a
whole with tokenizer.json's post-processor (``add_special_tokens``), except when it starts with
the bos token, as transformers' processor ``apply_chat_template(tokenize=True)`` does (calling the
processor on ``apply_chat_template``'s text adds a second bos when the post-processor adds one;
SmolVLM's own tokenizer adds none, so both agree there).

Chat template: a prompt without ``<image>`` is the user's message (our ``qa_prompt(q)`` layout,
which ``ternvlm generate`` wraps questions in, becomes ``q``; the caption prompt becomes
"Can you describe this image?"). With a chat template (and ``chat`` on) it is rendered with jinja2 as transformers does (sandboxed environment,
``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``tojson``,
``strftime_now``, the tokenizer's special tokens as variables) for the conversation ``[{"role":
"user", "content": [{"type": "image"}, ..., {"type": "text", "text": prompt}]}]`` with
``add_generation_prompt=True``; SmolVLM-Instruct gives
``<|im_start|>User:<image>prompt<end_of_utterance>\\nAssistant:``. Without a template it is
``<image>`` + prompt. A prompt that already holds ``<image>`` is used as given. A training target
is appended as `` target`` + ``<end_of_utterance>`` (chat) or eos. The template is read as
transformers' processor reads it: ``processor_config.json``'s ``chat_template``, else
``chat_template.json``, else ``chat_template.jinja``; as a fallback, ``tokenizer_config.json``'s.

Generation stops at eos, at every id of ``generation_config.json``'s ``eos_token_id`` (an int or
a list) and at ``<end_of_utterance>``: :attr:`SmolVLMProcessor.stop_ids`.

Where the settings live: :func:`read_settings` reads the folder (``processor_config.json``'s
nested ``image_processor``, else ``preprocessor_config.json``, with transformers'
``Idefics3ImageProcessor`` defaults for absent keys; ``image_seq_len`` from
``processor_config.json``) into a JSON dict stored as ``VLMConfig.processor``, so a saved
checkpoint or an exported .tflite rebuilds the same processor
(:func:`~ternvlm.models.processor.processor_for`).

Our pipeline (``ternvlm eval``/``ternarize`` on the synthetic shapes data) calls
:meth:`~SmolVLMProcessor.encode` and :meth:`~SmolVLMProcessor.pixels` with one image per prompt:
these never split (one m x m view per image, exactly transformers' ``do_image_splitting=False``)
and use the chat template. Splitting happens in :meth:`~SmolVLMProcessor.prepare` (what
``generate`` uses) when :attr:`~SmolVLMProcessor.split` is on (the checkpoint's
``do_image_splitting``; set it to False to turn splitting off). A .tflite takes one view per
prompt, so :class:`~ternvlm.runtime.vlm.TfliteVLM` turns splitting off.

Not covered: transformers' torchvision ("fast") image processor, whose LANCZOS falls back to
antialiased bicubic on older torchvision (pixels differ); ``max_image_size`` other than the vision
``image_size``; ``do_convert_rgb=false`` (images are always RGB); transformers dropping views that
are all exactly 0.0 after normalization (padding images; a real image view never is with
SmolVLM's mean/std of 0.5, as uint8 x / 255 is never 0.5); batches of prompts with images of
different sizes (``do_pad``: every view here is m x m).
"""

from __future__ import annotations

import functools
import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from ..config import VLMConfig
from ..errors import TernvlmError
from .processor import CAPTION_PROMPT, Encoded, Processor

KIND = "idefics3"
PROCESSOR_CONFIG, PREPROCESSOR = "processor_config.json", "preprocessor_config.json"
CHAT_JSON, CHAT_JINJA = "chat_template.json", "chat_template.jinja"
TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP = "tokenizer_config.json", "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"

IMAGE, FAKE, GLOBAL = "<image>", "<fake_token_around_image>", "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
MAX_IMAGE_SIZE = 4096  # transformers' absolute maximum edge after the longest-edge resize
_LANCZOS = 1
_TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
_OUR_QA = re.compile(r"question: (.*) answer:", re.DOTALL)  # processor.qa_prompt's layout
CAPTION_QUESTION = "Can you describe this image?"  # SmolVLM's README example


def user_message(prompt: str) -> str:
    """A toolkit prompt -> the user's chat message: ``qa_prompt(q)`` -> q, the caption prompt ->
    "Can you describe this image?", anything else as is."""
    if prompt.strip() == CAPTION_PROMPT:
        return CAPTION_QUESTION
    m = _OUR_QA.fullmatch(prompt.strip())
    return m.group(1).strip() if m else prompt


# -- reading a transformers folder -----------------------------------------------------------


def _read_json(path: Path, what: str) -> dict[str, Any] | None:
    """A JSON object, or None when the file is absent."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TernvlmError(f"corrupt {what} {path}: {exc}") from None
    if not isinstance(data, dict):
        raise TernvlmError(f"corrupt {what} {path}: expected a JSON object")
    return data


def image_processor_dict(folder: Path) -> dict[str, Any] | None:
    """The image processor's settings as transformers finds them: ``processor_config.json``'s
    nested ``image_processor`` (what transformers 5 saves), else ``preprocessor_config.json``;
    None when there are neither."""
    proc = _read_json(folder / PROCESSOR_CONFIG, "processor config") or {}
    nested = proc.get("image_processor")
    if isinstance(nested, dict):
        return nested
    return _read_json(folder / PREPROCESSOR, "preprocessor config")


def _pick_template(value: Any, where: Path) -> str | None:
    """A template string from a string, a {name: template} dict or a [{name, template}] list."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(value, dict):
        if isinstance(value.get("default"), str):
            return value["default"]
        raise TernvlmError(
            f"unsupported chat template in {where}: several templates and none named 'default'"
        )
    raise TernvlmError(f"corrupt chat template in {where}: {type(value).__name__}")


def read_chat_settings(proc: Any, s: dict[str, Any], name: str) -> None:
    """Sets ``proc``'s chat_template, chat, special_tokens and stop_ids from stored processor
    settings ``s`` (shared by the SmolVLM and LLaVA processors); ``name`` goes in the error."""
    try:
        proc.chat_template = s.get("chat_template")
        proc.chat = bool(s.get("use_chat_template", True))
        proc.special_tokens = dict(s.get("special_tokens") or {})
        proc.stop_ids = tuple(int(i) for i in s.get("stop_ids") or ())
    except (TypeError, ValueError) as exc:
        raise TernvlmError(f"invalid {name} processor settings: {exc!r}") from None
    if proc.chat_template is not None and not isinstance(proc.chat_template, str):
        raise TernvlmError(f"invalid {name} processor settings: chat_template")


def read_chat_template(folder: Path) -> str | None:
    """The processor's chat template (see the module docstring for the order), or None."""
    proc = _read_json(folder / PROCESSOR_CONFIG, "processor config") or {}
    if proc.get("chat_template") is not None:
        return _pick_template(proc["chat_template"], folder / PROCESSOR_CONFIG)
    legacy = _read_json(folder / CHAT_JSON, "chat template")
    if legacy is not None:
        return _pick_template(legacy.get("chat_template"), folder / CHAT_JSON)
    if (folder / CHAT_JINJA).exists():
        return (folder / CHAT_JINJA).read_text(encoding="utf-8")
    tok_cfg = _read_json(folder / TOKENIZER_CONFIG, "tokenizer config") or {}
    return _pick_template(tok_cfg.get("chat_template"), folder / TOKENIZER_CONFIG)


def _special_token_strings(folder: Path) -> dict[str, str]:
    """bos/eos/unk/pad token strings (chat template variables), from tokenizer_config.json or
    special_tokens_map.json."""
    out: dict[str, str] = {}
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):  # tokenizer_config.json wins
        data = _read_json(folder / name, "tokenizer config") or {}
        for key in _TEMPLATE_TOKENS:
            val = data.get(key)
            if isinstance(val, dict):
                val = val.get("content")
            if isinstance(val, str):
                out[key] = val
    return out


def _eos_ids(folder: Path) -> list[int]:
    gen = _read_json(folder / GENERATION_CONFIG, "generation config") or {}
    eos = gen.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else eos or []
    if not isinstance(eos, list) or not all(isinstance(i, int) for i in eos):
        raise TernvlmError(f"corrupt generation config {folder / GENERATION_CONFIG}: eos_token_id")
    return eos


def _longest_edge(value: Any, name: str, where: str) -> int:
    if isinstance(value, dict) and isinstance(value.get("longest_edge"), int):
        return value["longest_edge"]
    raise TernvlmError(f"unsupported {where}: {name} {value!r} (needs an integer longest_edge)")


def read_settings(folder: Path, cfg: VLMConfig, tokenizer: Tokenizer) -> dict[str, Any] | None:
    """The SmolVLM processor settings of a transformers folder (stored as ``cfg.processor``), or
    None when the tokenizer lacks Idefics3's image tokens (``<fake_token_around_image>``,
    ``<global-img>``): such a folder keeps the plain ``<bos> <image> x N prompt`` layout."""
    if tokenizer.token_to_id(FAKE) is None or tokenizer.token_to_id(GLOBAL) is None:
        return None
    where = f"preprocessor config of {folder}"
    pre = image_processor_dict(folder)
    side = cfg.vision.image_size
    if pre is None:  # no image processor saved: the encoder's size, transformers' 4x longest edge
        pre = {"max_image_size": {"longest_edge": side}, "size": {"longest_edge": 4 * side}}
    m = _longest_edge(pre.get("max_image_size", {"longest_edge": 364}), "max_image_size", where)
    if m != side:
        raise TernvlmError(
            f"unsupported {where}: max_image_size {m} != the vision encoder's image_size {side}"
        )
    size = pre.get("size", {"longest_edge": 4 * 364})
    if not (
        isinstance(size, dict)
        and (
            isinstance(size.get("longest_edge"), int)
            or (isinstance(size.get("height"), int) and isinstance(size.get("width"), int))
        )
    ):
        raise TernvlmError(f"unsupported {where}: size {size!r} (longest_edge or height/width)")
    size = (
        {"longest_edge": size["longest_edge"]}
        if size.get("longest_edge")
        else {"height": size["height"], "width": size["width"]}
    )
    proc = _read_json(folder / PROCESSOR_CONFIG, "processor config") or {}
    seq = proc.get("image_seq_len", cfg.image_tokens)
    if seq != cfg.image_tokens:
        raise TernvlmError(
            f"unsupported processor config {folder / PROCESSOR_CONFIG}: image_seq_len {seq} != "
            f"{cfg.image_tokens} image tokens of the model ((image_size / patch_size)^2 / "
            "scale_factor^2)"
        )
    eou = tokenizer.token_to_id(END_OF_UTTERANCE)
    stops = _eos_ids(folder) + ([eou] if eou is not None else [])
    settings = {
        "kind": KIND,
        "image_seq_len": int(seq),
        "do_image_splitting": bool(pre.get("do_image_splitting", True)),
        "do_resize": bool(pre.get("do_resize", True)),
        "size": size,
        "max_image_size": {"longest_edge": m},
        "resample": pre.get("resample", _LANCZOS),
        "do_rescale": bool(pre.get("do_rescale", True)),
        "rescale_factor": pre.get("rescale_factor", 1 / 255),
        "do_normalize": bool(pre.get("do_normalize", True)),
        "chat_template": read_chat_template(folder),
        "use_chat_template": True,
        "special_tokens": _special_token_strings(folder),
        "stop_ids": list(dict.fromkeys(stops)),
    }
    SmolVLMProcessor(cfg, tokenizer, settings)  # validates them
    return settings


# -- chat template ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # jinja2 is a dependency (torch needs it too)
        raise TernvlmError("rendering a chat template needs jinja2: pip install jinja2") from None

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-mask markers): the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno
            )

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise TernvlmError(f"invalid chat template: {exc}") from None


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
    """``template`` rendered as transformers' ``apply_chat_template`` renders it."""
    compiled = _compile(template)  # a TernvlmError without jinja2
    import jinja2

    try:
        return compiled.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateError as exc:
        raise TernvlmError(f"chat template error: {exc}") from None


# -- images ---------------------------------------------------------------------------------


def _rgb(im: Image.Image) -> Image.Image:
    """transformers' ``convert_to_rgb``: any alpha (band or transparency) composited on white."""
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """(height, width) with the longest edge ``longest``, as transformers'
    ``_resize_output_size_rescale_to_max_len`` then ``..._scale_below_upper_bound(4096)``."""
    aspect = width / height
    if width >= height:
        width = longest
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def multiple_size(height: int, width: int, m: int) -> tuple[int, int]:
    """transformers' ``resize_for_vision_encoder``: both edges rounded up to multiples of m."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / m) * m
        height = math.ceil(int(width / aspect) / m) * m
    else:
        height = math.ceil(height / m) * m
        width = math.ceil(int(height * aspect) / m) * m
    return height, width


# -- the processor --------------------------------------------------------------------------


class SmolVLMProcessor(Processor):
    """transformers' ``Idefics3Processor`` (image splitting, prompt expansion, chat template) on
    our tokenizer; see the module docstring. ``settings``: ``cfg.processor`` when not given.

    ``split`` (default: the checkpoint's ``do_image_splitting``) decides whether
    :meth:`prepare` tiles images; ``chat`` (default on) whether plain prompts go through the chat
    template when there is one. Both are plain attributes: set them to change the behaviour.
    """

    def __init__(
        self,
        cfg: VLMConfig,
        tokenizer: Tokenizer,
        settings: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(cfg, tokenizer)
        s = cfg.processor if settings is None else settings
        if not isinstance(s, dict) or s.get("kind") != KIND:
            raise TernvlmError(f"invalid model config: processor settings {s!r} are not SmolVLM's")
        try:
            self.image_seq_len = int(s["image_seq_len"])
            self.split = bool(s["do_image_splitting"])
            self.do_resize = bool(s["do_resize"])
            self.size = dict(s["size"])
            self.max_size = int(s["max_image_size"]["longest_edge"])
            self.resample = Image.Resampling(int(s["resample"]))
            self.do_rescale = bool(s["do_rescale"])
            self.rescale_factor = float(s["rescale_factor"])
            self.do_normalize = bool(s["do_normalize"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TernvlmError(f"invalid SmolVLM processor settings: {exc!r}") from None
        read_chat_settings(self, s, "SmolVLM")
        if self.image_seq_len != cfg.image_tokens or self.max_size != cfg.vision.image_size:
            raise TernvlmError(
                f"invalid SmolVLM processor settings: image_seq_len {self.image_seq_len} / "
                f"max_image_size {self.max_size} do not fit the model ({cfg.image_tokens} image "
                f"tokens of a {cfg.vision.image_size}px view)"
            )
        image_id = tokenizer.token_to_id(IMAGE)
        if image_id != cfg.image_token_id:
            raise TernvlmError(
                f"the tokenizer's {IMAGE} is id {image_id}, the model's image_token_id is "
                f"{cfg.image_token_id}"
            )
        self.end_of_utterance_id = tokenizer.token_to_id(END_OF_UTTERANCE)

    # -- images -------------------------------------------------------------------------------
    def _resize(self, im: Image.Image, height: int, width: int) -> Image.Image:
        return im.resize((width, height), resample=self.resample, reducing_gap=None)

    def _resized(self, image: Image.Image) -> Image.Image:
        """RGB, then transformers' ``do_resize`` step."""
        im = _rgb(image)
        if not self.do_resize:
            return im
        if "longest_edge" in self.size:
            h, w = longest_edge_size(im.height, im.width, self.size["longest_edge"])
        else:
            h, w = self.size["height"], self.size["width"]
        return self._resize(im, h, w)

    def _tensor(self, views: list[Image.Image]) -> torch.Tensor:
        x = np.stack([np.asarray(v, dtype=np.uint8) for v in views])  # [n, m, m, 3]
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x.astype(np.float32, copy=False)
            mean = np.asarray(self.cfg.vision.image_mean, dtype=np.float32)
            std = np.asarray(self.cfg.vision.image_std, dtype=np.float32)
            x = (x - mean) / std
        x = np.ascontiguousarray(x.astype(np.float32, copy=False).transpose(0, 3, 1, 2))
        return torch.from_numpy(x)

    def tile_views(self, image: Image.Image) -> tuple[list[Image.Image], int, int]:
        """(views, rows, cols) of one image with splitting: rows x cols tiles then the global
        view, or (the one view, 0, 0) when the resized image is not larger than m x m."""
        m = self.max_size
        im = self._resized(image)
        im = self._resize(im, *multiple_size(im.height, im.width, m))
        if im.height <= m and im.width <= m:
            return [im], 0, 0
        rows, cols = im.height // m, im.width // m
        views = [
            im.crop((c * m, r * m, (c + 1) * m, (r + 1) * m))
            for r in range(rows)
            for c in range(cols)
        ]
        return views + [self._resize(im, m, m)], rows, cols

    def tiles(self, image: Image.Image) -> tuple[torch.Tensor, int, int]:
        """transformers' pixel_values of one image with splitting: ([K+1, 3, m, m], rows, cols)
        with K = rows x cols tiles and the global view last ([1, 3, m, m], 0, 0 unsplit)."""
        views, rows, cols = self.tile_views(image)
        return self._tensor(views), rows, cols

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """One m x m view per image, [B, 3, m, m]: transformers with ``do_image_splitting=False``
        (what :meth:`encode` lays out; our training and evaluation pipeline uses these)."""
        m = self.max_size
        return self._tensor([self._resize(self._resized(im), m, m) for im in images])

    # -- text ---------------------------------------------------------------------------------
    def image_text(self, rows: int = 0, cols: int = 0) -> str:
        """What one ``<image>`` of the prompt becomes (``Idefics3Processor.replace_image_token``)."""
        img = IMAGE * self.image_seq_len
        if rows == 0 and cols == 0:
            return f"{FAKE}{GLOBAL}{img}{FAKE}"
        text = ""
        for r in range(rows):
            for c in range(cols):
                text += f"{FAKE}<row_{r + 1}_col_{c + 1}>{img}"
            text += "\n"
        return text + f"\n{FAKE}{GLOBAL}{img}{FAKE}"

    def uses_chat(self) -> bool:
        return self.chat and self.chat_template is not None

    def prompt_text(self, prompt: str, n_images: int = 1) -> str:
        """The prompt before image expansion: as given when it holds ``<image>``, else the user
        message of the chat template (or ``<image>`` x n + prompt without one)."""
        if IMAGE in prompt:
            return prompt
        if not self.uses_chat():
            return IMAGE * n_images + prompt
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": user_message(prompt)}]
        return render_chat_template(
            self.chat_template,
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            **self.special_tokens,
        )

    def expand(self, text: str, grids: list[tuple[int, int]]) -> str:
        parts = text.split(IMAGE)
        if len(parts) - 1 != len(grids):
            raise TernvlmError(
                f"the prompt has {len(parts) - 1} {IMAGE} tokens for {len(grids)} images"
            )
        out = parts[0]
        for (rows, cols), part in zip(grids, parts[1:], strict=True):
            out += self.image_text(rows, cols) + part
        return out

    def encode(
        self,
        prompt: str,
        target: str | None = None,
        grids: list[tuple[int, int]] | None = None,
    ) -> Encoded:
        """Prompt ids with each image expanded (``grids``: (rows, cols) per image, from
        :meth:`tiles`; None: one unsplit image, the layout of :meth:`pixels`) and, when given,
        `` target`` + <end_of_utterance> (chat) or <eos> appended."""
        n_images = len(grids) if grids is not None else max(1, prompt.count(IMAGE))
        text = self.prompt_text(prompt, n_images)
        text = self.expand(text, [(0, 0)] * text.count(IMAGE) if grids is None else grids)
        bos = self.special_tokens.get("bos_token")
        add_special = not (bos and text.startswith(bos))
        ids = self.tokenizer.encode(text, add_special_tokens=add_special).ids
        return self.finish(ids, target, self.end_of_utterance_id if self.uses_chat() else None)

    def prepare(
        self, images: list[Image.Image], prompt: str, target: str | None = None
    ) -> tuple[Encoded, torch.Tensor]:
        """transformers' ``Idefics3Processor(images=..., text=...)`` for one prompt: ids and the
        views of every image in order, split when :attr:`split` is on."""
        if not self.split:
            grids = [(0, 0)] * len(images)
            return self.encode(prompt, target, grids), self.pixels(images)
        grids, views = [], []
        for im in images:
            v, rows, cols = self.tile_views(im)
            grids.append((rows, cols))
            views += v
        return self.encode(prompt, target, grids), self._tensor(views)
