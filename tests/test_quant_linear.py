import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ternvlm.errors import TernvlmError
from ternvlm.models.checkpoint import load_checkpoint, save_checkpoint
from ternvlm.quant.api import clip_latents_, quant_layers, quantize_, selected_linears
from ternvlm.quant.config import QuantConfig, preset
from ternvlm.quant.init import quantize_groups
from ternvlm.quant.linear import QuantLinear


def _lin(n=6, k=8, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    return lin


@pytest.mark.parametrize("init", ["kmeans", "optimal", "absmean", "twn", "random"])
@pytest.mark.parametrize("gran", ["tensor", "row", "group:4"])
def test_from_linear_reproduces_the_init(init, gran):
    lin = _lin(6, 8)
    cfg = QuantConfig(init=init, granularity=gran).validate()
    q = QuantLinear.from_linear(lin, cfg)
    groups = cfg.gran.to_groups(lin.weight.detach())
    r = quantize_groups(groups, init, "ternary")
    assert torch.equal(q.codes(), r.codes.reshape(6, 8))
    assert torch.allclose(q.weight_q(), r.dequant().reshape(6, 8), atol=1e-6)
    assert q.latent.abs().max() <= 1


@pytest.mark.parametrize("bits", ["ternary", "binary"])
def test_ste_gradient_equals_float_gradient_wrt_quantized_weight(bits):
    lin = _lin(5, 12)
    cfg = QuantConfig(bits=bits, granularity="group:4").validate()
    q = QuantLinear.from_linear(lin, cfg)
    x = torch.randn(3, 12)
    target = torch.randn(3, 5)
    # float reference: the quantized weight as a leaf
    wq = q.weight_q().detach().requires_grad_(True)
    F.mse_loss(F.linear(x, wq, q.bias.detach()), target).backward()
    F.mse_loss(q(x), target).backward()
    s = q.effective_scale().detach().repeat_interleave(4, 1)
    expected = wq.grad * s
    assert torch.allclose(q.latent.grad, expected, atol=1e-6)


def test_recompute_scale_is_l2_optimal_centroid():
    lin = _lin(4, 16)
    q = QuantLinear.from_linear(lin, QuantConfig(scale="recompute", latent_clip=None).validate())
    r = quantize_groups(lin.weight.detach(), "kmeans")
    assert torch.allclose(q.effective_scale()[:, 0], r.scale, atol=1e-6)


def test_quantize_selects_parts_and_keeps_lm_head(tiny):
    model, _ = tiny
    names = selected_linears(model, QuantConfig(parts=("decoder",)))
    assert names and all(n.startswith("decoder.") for n in names)
    assert "decoder.lm_head" not in names
    report = quantize_(model, QuantConfig().validate())
    layers = quant_layers(model)
    assert set(layers) == set(report.layers)
    assert any(n.startswith("vision.") for n in layers)
    assert isinstance(model.decoder.lm_head, nn.Linear)
    assert report.max_iterations >= 1 and 0 < report.mean_rel_error < 1


def test_bad_inputs(tiny):
    model, _ = tiny
    with pytest.raises(TernvlmError, match="unknown ternary init"):
        quantize_(model, QuantConfig(init="median"))
    with pytest.raises(TernvlmError, match="unknown granularity"):
        quantize_(model, QuantConfig(granularity="col"))
    with pytest.raises(TernvlmError, match="does not divide"):
        quantize_(model, QuantConfig(granularity="group:7"))
    with pytest.raises(TernvlmError, match="no nn.Linear layers selected"):
        quantize_(model, QuantConfig(exclude=("",)))
    with pytest.raises(TernvlmError, match="unknown binary init"):
        QuantConfig(bits="binary", init="twn").validate()
    with pytest.raises(TernvlmError, match="unknown preset"):
        preset("llama")
    assert not quant_layers(model)  # nothing was swapped by a failed call


def test_seed_preset_matches_the_paper():
    p = preset("seed")
    assert (p.init, p.granularity, p.kmeans_iters, p.scale) == ("kmeans", "row", 10, "learned")
    assert p.learn_bias and p.output_clip == 100.0 and p.parts == ("decoder",)


def test_clip_latents():
    q = QuantLinear.from_linear(_lin(), QuantConfig().validate())
    with torch.no_grad():
        q.latent.mul_(5)
    m = nn.Sequential(q)
    clip_latents_(m)
    assert q.latent.abs().max() <= 1


@pytest.mark.parametrize("bits", ["ternary", "binary"])
def test_packed_checkpoint_round_trip(tiny, tokenizer, tmp_path, bits):
    model, proc = tiny
    cfg = preset("seed" if bits == "ternary" else "binary", granularity="group:8")
    quantize_(model, cfg)
    model.cfg.quantization_config = cfg.to_dict()
    pixels = proc.pixels([Image.new("RGB", (32, 32), "red")])
    ids = torch.tensor([[1] + [3] * model.cfg.image_tokens + [5, 6, 7]])
    with torch.no_grad():
        ref = model(ids, image_features=model.encode_image(pixels))
    save_checkpoint(tmp_path / "q", model, tokenizer)
    loaded, _ = load_checkpoint(tmp_path / "q")
    with torch.no_grad():
        out = loaded(ids, image_features=loaded.encode_image(pixels))
    assert torch.allclose(ref, out, atol=1e-5)
    for name, m in quant_layers(loaded).items():
        assert torch.equal(m.codes(), quant_layers(model)[name].codes())
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "q" / "model.safetensors"))
    qw = [v for k, v in sd.items() if k.endswith(".qweight")]
    assert qw and all(v.dtype == torch.uint8 for v in qw)
    assert not any(k.endswith(".latent") for k in sd)


def test_corrupt_packed_codes_are_refused(tiny, tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = tiny
    cfg = preset("ternvlm")
    quantize_(model, cfg)
    model.cfg.quantization_config = cfg.to_dict()
    save_checkpoint(tmp_path / "q", model, tokenizer)
    path = tmp_path / "q" / "model.safetensors"
    sd = load_file(str(path))
    key = next(k for k in sd if k.endswith(".qweight"))
    sd[key] = torch.full_like(sd[key], 255)
    save_file(sd, str(path))
    with pytest.raises(TernvlmError, match="invalid codes"):
        load_checkpoint(tmp_path / "q")
