"""The block: shapes, dtypes, config validation, and the analytic (complex) path."""

import pytest
import torch
import torch.nn.functional as F
from conftest import batch, small_model

from ept import EPTConfig, EquilibriumLM, analytic


def test_field_shapes_and_dtypes():
    for dtype in (torch.float32, torch.float64):
        model = EquilibriumLM(EPTConfig(vocab_size=40, C=16, H=4, T=8)).to(dtype)
        idx = torch.randint(0, 40, (2, 8))
        x = model.inject(idx)
        z = torch.randn_like(x)
        fz = model.field(z, x)
        assert fz.shape == (2, 8, 16) and fz.dtype == dtype
        assert model.readout(z).shape == (2, 8, 40)


def test_field_formula_with_zero_block_weights():
    """With the block's maps zeroed, F(z) = x - (1+c) z exactly."""
    model = small_model(c=0.7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("attn", "ffn")):
                p.zero_()
    idx, _ = batch(model)
    x = model.inject(idx)
    z = torch.randn_like(x)
    torch.testing.assert_close(model.field(z, x), x - 1.7 * z)


def test_attention_is_causal():
    model = small_model(scale=3.0)
    idx, _ = batch(model, B=1)
    x = model.inject(idx)
    z = torch.randn_like(x)
    z2 = z.clone()
    z2[:, -1] += 1.0  # perturb the last position only
    diff = (model.field(z2, x) - model.field(z, x))[:, :-1]
    assert diff.abs().max() < 1e-12


@pytest.mark.parametrize("qknorm", [False, True])
def test_analytic_path_equals_fused_on_real_inputs(qknorm):
    model = small_model(scale=3.0, qknorm=qknorm)
    idx, _ = batch(model)
    x = model.inject(idx)
    z = torch.randn_like(x)
    fused = model.field(z, x)
    explicit = model.field(z, x, fused=False)
    as_complex = model.field(z.to(torch.complex128), x)
    torch.testing.assert_close(explicit, fused, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(as_complex.real, fused, rtol=1e-10, atol=1e-12)
    assert as_complex.imag.abs().max() < 1e-14


def test_analytic_nonlinearities_match_torch_on_reals():
    h = torch.randn(4, 7, dtype=torch.float64) * 3
    w, b = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(analytic.softmax(h), torch.softmax(h, -1))
    torch.testing.assert_close(analytic.gelu(h), F.gelu(h, approximate="tanh"))
    torch.testing.assert_close(analytic.layer_norm(h, w, b, 1e-5), F.layer_norm(h, (7,), w, b, 1e-5))
    torch.testing.assert_close(analytic.logsumexp(h), torch.logsumexp(h, -1))
    mask = torch.ones(4, 7, dtype=torch.bool).tril()
    torch.testing.assert_close(analytic.softmax(h, mask=mask), torch.softmax(h.masked_fill(~mask, -1e30), -1))


@pytest.mark.parametrize("fn", ["softmax", "gelu", "layer_norm", "field", "loss"])
def test_cauchy_riemann(fn):
    """A holomorphic map has df/dz equal along the real and imaginary directions: f(z+h) - f(z)
    ≈ h·f'(z) and f(z+ih) - f(z) ≈ ih·f'(z), i.e. the two finite differences differ by a factor i."""
    model = small_model(scale=2.0)
    idx, tgt = batch(model)
    x = model.inject(idx).detach()
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 8, 16, generator=g, dtype=torch.float64)
    z = torch.complex(base, 0.1 * torch.randn(3, 8, 16, generator=g, dtype=torch.float64))
    d = torch.randn(3, 8, 16, generator=g, dtype=torch.float64).to(torch.complex128)
    maps = {
        "softmax": analytic.softmax,
        "gelu": analytic.gelu,
        "layer_norm": lambda u: analytic.layer_norm(u, None, None, 1e-5),
        "field": lambda u: model.field(u, x),
        "loss": lambda u: model.loss(u, tgt),
    }
    f = maps[fn]
    h = 1e-6
    along_real = (f(z + h * d) - f(z - h * d)) / (2 * h)
    along_imag = (f(z + 1j * h * d) - f(z - 1j * h * d)) / (2j * h)
    scale = along_real.abs().max()
    assert scale > 1e-6
    assert (along_real - along_imag).abs().max() / scale < 1e-6


def test_non_holomorphic_map_fails_cauchy_riemann():
    """The check above can fail: |z|² is not holomorphic and is caught."""
    z = torch.randn(5, dtype=torch.complex128)
    d = torch.randn(5, dtype=torch.complex128)
    h = 1e-6

    def f(u):
        return u * u.conj()

    along_real = (f(z + h * d) - f(z - h * d)) / (2 * h)
    along_imag = (f(z + 1j * h * d) - f(z - 1j * h * d)) / (2j * h)
    assert (along_real - along_imag).abs().max() > 1e-3


def test_config_rejects_bad_values_and_unknown_names():
    with pytest.raises(ValueError, match="divisible"):
        EPTConfig(C=10, H=3)
    with pytest.raises(ValueError, match="positive"):
        EPTConfig(T=0)
    with pytest.raises(ValueError, match="damping"):
        EPTConfig(c=-1.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'qknrom'"):
        EPTConfig(qknrom=True)
    with pytest.raises(TypeError, match="did you mean 'qknorm'"):
        EPTConfig.from_dict({"qknrom": True})


def test_inject_rejects_too_long_sequences():
    model = small_model()
    with pytest.raises(ValueError, match="exceeds"):
        model.inject(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("emb_std", [0.0, 1.0])
def test_embeddings_take_emb_std_and_every_linear_map_init_std(emb_std):
    torch.manual_seed(0)
    model = EquilibriumLM(EPTConfig(vocab_size=512, C=64, H=4, T=64, init_std=0.02, emb_std=emb_std))
    want = emb_std or 0.02
    for emb in (model.wte, model.wpe):
        assert abs(emb.weight.std().item() / want - 1) < 0.05
    for lin in (model.attn.q, model.ffn.fc1, model.head):
        assert abs(lin.weight.std().item() / 0.02 - 1) < 0.05


def test_a_negative_emb_std_is_refused():
    with pytest.raises(ValueError, match="emb_std"):
        EPTConfig(emb_std=-1.0)
