from hypothesis import given, settings
from hypothesis import strategies as st

from ternvlm.models.processor import Processor

from .conftest import tiny_config


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_byte_level_tokenizer_round_trips_any_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == text


def test_layout_has_image_slots_then_prompt_then_target(tokenizer):
    cfg = tiny_config(tokenizer.get_vocab_size())
    proc = Processor(cfg, tokenizer)
    e = proc.encode("question: what colour is the circle? answer:", "red")
    assert e.ids[0] == cfg.bos_token_id
    assert e.ids[1 : 1 + cfg.image_tokens] == [cfg.image_token_id] * cfg.image_tokens
    assert e.ids[-1] == cfg.eos_token_id
    assert proc.decode(e.ids[e.target_start :]) == "red"
