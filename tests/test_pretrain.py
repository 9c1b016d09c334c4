import json

import torch

from ternvlm.models.checkpoint import load_checkpoint
from ternvlm.train.pretrain import PretrainConfig, TrainStream, lr_at, pretrain

from .conftest import tiny_config


def tiny_run(steps: int) -> PretrainConfig:
    return PretrainConfig(
        steps=steps,
        batch_images=4,
        seqs_per_image=3,
        eval_every=4,
        val_scenes=4,
        test_scenes=4,
        warmup=2,
        lr=3e-3,
        threads=1,
        data_workers=0,
        model=tiny_config(512),
    )


def test_pretrain_writes_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "run"
    m = pretrain(out, tiny_run(8), command="test")
    assert 0 <= m["qa_accuracy"] <= 1 and m["perplexity"] > 1
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 8]
    card = (out / "final" / "README.md").read_text()
    assert "command: `test`" in card and "qa_accuracy" in card
    model, proc = load_checkpoint(out / "final")
    assert model.cfg.decoder.vocab_size == proc.tokenizer.get_vocab_size()
    # resume: a longer run starts from the saved step instead of zero
    pretrain(out, tiny_run(12), command="test")
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 8, 12]
    assert not list(out.glob(".checkpoint*")) and not list(out.glob(".final*"))
    assert (out / "curve.png").stat().st_size > 1000


def test_train_stream_is_deterministic_by_step(tokenizer):
    from ternvlm.models.processor import Processor

    c = tiny_run(4)
    proc = Processor(c.model, tokenizer)
    a_px, a_b = TrainStream(proc, c, 0).batch(3)
    b_px, b_b = TrainStream(proc, c, 2).batch(3)
    assert torch.equal(a_px, b_px)
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a_b, b_b, strict=True))
    # every sequence has image slots and at least one target token
    for b in a_b:
        assert ((b.labels != -100).sum(1) > 0).all()
        assert ((b.input_ids == c.model.image_token_id).sum(1) == c.model.image_tokens).all()


def test_lr_schedule_warms_up_and_decays():
    c = PretrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, c) < lr_at(9, c) <= 1.0
    assert abs(lr_at(10, c) - 1.0) < 1e-6
    assert abs(lr_at(99, c) - 0.1) < 0.01
