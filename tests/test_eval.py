import math

from ternvlm.data.registry import shapes_eval_set
from ternvlm.eval.evaluate import evaluate, mismatch_permutation, score_items
from ternvlm.models.generate import GenerationConfig, generate_ids


def test_mismatch_permutation_is_a_derangement():
    for n in (2, 3, 10, 101):
        p = mismatch_permutation(n)
        assert sorted(p) == list(range(n))
        assert all(p[i] != i for i in range(n))


def test_evaluate_reports_required_fields(tiny):
    model, proc = tiny
    data = shapes_eval_set("val", 6, image_size=32)
    m = evaluate(model, proc, data)
    for k in (
        "perplexity",
        "perplexity_mismatched_image",
        "qa_accuracy",
        "n_examples",
        "perplexity_content",
    ):
        assert k in m and math.isfinite(m[k])
    assert m["n_examples"] == len(data.items)
    # a random model is close to uniform over the vocabulary
    assert (
        0.2 * proc.tokenizer.get_vocab_size()
        < m["perplexity"]
        < 5 * proc.tokenizer.get_vocab_size()
    )


def test_teacher_forced_accuracy_equals_greedy_generation(default_model):
    """The shipped model gets some answers right and some wrong; both must agree with generate."""
    model, proc = default_model
    data = shapes_eval_set("test", 24)
    # a wrong target for some items so that both outcomes occur
    for it in data.items[::5]:
        it.target = "purple" if it.target != "purple" else "green"
    feats = model.encode_image(proc.pixels(data.images))
    s = score_items(model, proc, data, feats)
    g = GenerationConfig(max_new_tokens=64)
    for it, ok in zip(data.items, s.correct, strict=True):
        enc = proc.encode(it.prompt)
        ids = generate_ids(model, enc.ids, proc.pixels([data.images[it.image_id]]), g)
        assert ok == (ids == proc.tokens(" " + it.target.strip())), it
    assert 0 < sum(s.correct) < len(s.correct)
