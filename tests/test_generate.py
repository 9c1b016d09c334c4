import pytest
import torch

from ternvlm.models.generate import GenerationConfig, generate_ids


def test_cached_logits_equal_full_forward(tiny):
    model, proc = tiny
    ids = torch.tensor([proc.encode("question: what shape is at the top left? answer:").ids])
    px = torch.randn(1, 3, 32, 32)
    feats = model.encode_image(px)
    full = model(ids, image_features=feats)
    cache = model.decoder.new_cache(1)
    split = ids.shape[1] - 5
    first = model(ids[:, :split], image_features=feats, cache=cache)
    rest = model(ids[:, split : split + 3], cache=cache)  # chunked prefill after a prefix
    steps = [model(ids[:, i : i + 1], cache=cache) for i in range(split + 3, ids.shape[1])]
    got = torch.cat([first, rest, *steps], dim=1)
    assert torch.allclose(got, full, atol=1e-5)


def test_kv_cache_generation_equals_no_cache(tiny):
    model, proc = tiny
    torch.manual_seed(1)
    for p in ("caption:", "question: how many shapes are there? answer:"):
        for seed in range(3):
            px = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
            ids = proc.encode(p).ids
            g = GenerationConfig(max_new_tokens=12)
            a = generate_ids(model, ids, px, g, use_cache=True)
            b = generate_ids(model, ids, px, g, use_cache=False)
            assert a == b and len(a) > 0


def test_sampling_is_seeded_and_respects_context(tiny):
    model, proc = tiny
    px = torch.randn(1, 3, 32, 32)
    ids = proc.encode("caption:").ids
    g = GenerationConfig(max_new_tokens=200, temperature=1.0, top_k=5, seed=3)
    a = generate_ids(model, ids, px, g)
    assert a == generate_ids(model, ids, px, g)
    assert len(ids) + len(a) <= model.cfg.decoder.max_seq_len


def test_decode_step_may_emit_the_image_token():
    """A generated image token is embedded as a token (transformers does the same), no error."""
    from ternvlm.models.checkpoint import load_checkpoint

    model, proc = load_checkpoint("default")
    enc = proc.encode("caption:")
    px = torch.zeros(1, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    cache = model.decoder.new_cache(1)
    with torch.no_grad():
        model(torch.tensor([enc.ids]), pixel_values=px, cache=cache)
        step = model(torch.tensor([[model.cfg.image_token_id]]), cache=cache)
        assert step.shape[:2] == (1, 1) and torch.isfinite(step).all()
        with pytest.raises(ValueError, match="no image"):  # a prompt still needs its image
            model(torch.tensor([enc.ids]))
