import json

import pytest
import torch

from ternvlm.config import VLMConfig
from ternvlm.errors import TernvlmError
from ternvlm.models.checkpoint import load_checkpoint, save_checkpoint
from ternvlm.models.vlm import VLM

from .conftest import tiny_config


def test_config_json_round_trip(tmp_path):
    cfg = tiny_config(
        100, norm="layernorm", mlp_type="gelu", parallel_block=True, partial_rotary=0.5
    )
    cfg.save(tmp_path / "c.json")
    again = VLMConfig.load(tmp_path / "c.json")
    assert again == cfg
    assert again.image_tokens == cfg.image_tokens == 4


@pytest.mark.parametrize(
    "patch",
    [
        {"decoder": {"heads": 3, "kv_heads": 2}},
        {"decoder": {"norm": "batchnorm"}},
        {"vision": {"patch_size": 7}},
        {"decoder": {"nonsense": 1}},
        {"connector": "oops"},
    ],
)
def test_invalid_configs_are_one_line_errors(tmp_path, patch):
    data = tiny_config(100).to_dict()
    for k, v in patch.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) else v
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(TernvlmError, match="invalid model config"):
        VLMConfig.load(tmp_path / "c.json")


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {
            "norm": "layernorm",
            "mlp_type": "gelu",
            "parallel_block": True,
            "partial_rotary": 0.5,
            "attn_bias": True,
            "mlp_bias": True,
            "tie_embeddings": False,
            "lm_head_bias": True,
        },
    ],
)
def test_weights_round_trip(tmp_path, tokenizer, opts):
    torch.manual_seed(0)
    model = VLM(tiny_config(tokenizer.get_vocab_size(), **opts)).eval()
    save_checkpoint(tmp_path / "ck", model, tokenizer)
    loaded, proc = load_checkpoint(tmp_path / "ck")
    assert loaded.cfg == model.cfg
    ids = torch.tensor([proc.encode("caption:", "a red circle").ids])
    px = torch.randn(1, 3, 32, 32)
    assert torch.equal(model(ids, px), loaded(ids, px))
    assert not list(tmp_path.glob(".ck*")), "atomic write left a temporary folder"
