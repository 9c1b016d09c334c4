"""Shared fixtures: a tiny random VLM and tokenizer, built locally in a second."""

from __future__ import annotations

import pytest
import torch

from ternvlm.config import ConnectorConfig, DecoderConfig, VisionConfig, VLMConfig
from ternvlm.data import shapes
from ternvlm.models.processor import Processor
from ternvlm.models.tokenizer import train_tokenizer
from ternvlm.models.vlm import VLM

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(shapes.vocabulary_text(), vocab_size=512)


def tiny_config(vocab_size: int, **decoder) -> VLMConfig:
    return VLMConfig(
        vision=VisionConfig(image_size=32, patch_size=8, hidden=32, layers=1, heads=2, mlp=64),
        connector=ConnectorConfig(scale_factor=2),
        decoder=DecoderConfig(
            vocab_size=vocab_size,
            hidden=32,
            layers=2,
            heads=4,
            kv_heads=2,
            mlp=64,
            max_seq_len=64,
            **decoder,
        ),
    )


@pytest.fixture()
def tiny(tokenizer):
    torch.manual_seed(0)
    cfg = tiny_config(tokenizer.get_vocab_size())
    model = VLM(cfg).eval()
    return model, Processor(cfg, tokenizer)


@pytest.fixture(scope="session")
def default_model():
    from ternvlm.models.checkpoint import load_checkpoint

    return load_checkpoint("default")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tokenizer):
    """A tiny random float checkpoint folder (the teacher for trainer tests)."""
    from ternvlm.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "tiny"
    save_checkpoint(path, VLM(tiny_config(tokenizer.get_vocab_size())), tokenizer)
    return path


@pytest.fixture(params=["connection", "offline"])
def no_network(request, monkeypatch):
    """huggingface_hub without network: a refused connection, or HF_HUB_OFFLINE's cache miss."""
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import LocalEntryNotFoundError

    def download(*args, **kwargs):
        if request.param == "offline":
            raise LocalEntryNotFoundError("outgoing traffic has been disabled.")
        raise ConnectionError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(hub, "snapshot_download", download)
    return request.param
