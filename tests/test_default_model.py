"""The shipped default model: loads with no training, fits the size budget, and uses its eyes."""

from ternvlm.data.registry import shapes_eval_set
from ternvlm.eval.evaluate import evaluate
from ternvlm.models.checkpoint import WEIGHTS, default_model_dir


def test_shipped_files_and_size():
    d = default_model_dir()
    for name in ("config.json", WEIGHTS, "tokenizer.json", "README.md"):
        assert (d / name).is_file(), name
    assert (d / WEIGHTS).stat().st_size <= 25 * 1024 * 1024
    card = (d / "README.md").read_text()
    assert "command:" in card and "seed:" in card and "steps:" in card


def test_default_model_sees_the_image(default_model):
    model, proc = default_model
    m = evaluate(model, proc, shapes_eval_set("test", 96))
    assert m["qa_accuracy"] >= 0.8, m
    assert m["perplexity"] <= 0.5 * m["perplexity_mismatched_image"], m
    assert m["perplexity_content"] <= 0.25 * m["perplexity_content_mismatched_image"], m
