"""The periphery of one analog matrix–vector product: DAC, crossbar read, noise, ADC.

    x_n = DAC(x / max|x|)                    per input vector (aihwkit's abs-max noise management)
    y_n = G·x_n + σ_out·ξ + σ_w·‖x_n‖·ξ'     output noise and per-read weight noise
    y   = ADC(clip(y_n, ±out_bound)) · max|x| · scale + bias

``G`` is the conductance matrix (weight / scale), so ``out_bound`` and the noise levels are in
aihwkit's normalised units (weights about ±1, inputs ±1). Weight read noise (the seed's ``--fnoise``)
is a fresh Gaussian perturbation of every conductance on every read; its effect on an output is
exactly Gaussian with std ``σ_w·‖x_n‖₂`` (aihwkit's output-referred ``w_noise``), so it costs one
noise draw per output instead of one per conductance.

Quantisers are signed b-bit converters: 2^b codes ``-2^(b-1) … 2^(b-1)-1`` times ``bound/2^(b-1)``
(aihwkit's symmetric ``res = 1/(2^b - 2)`` grid has 2^b - 1 levels). Rounding and clipping pass
gradients straight through, so the controller's linearisations (AsymEP's J·v, the local vjp) see
the read weights and the quantised inputs, never a zero derivative.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ept.config import setting


@dataclass
class IOConfig:
    """Converter resolutions (0 = ideal), output range and read noise, aihwkit's units."""

    inp_bits: int = setting(0, 'DAC resolution in bits (0: ideal)')
    out_bits: int = setting(0, 'ADC resolution in bits (0: ideal)')
    out_bound: float = setting(0.0, 'ADC range ±out_bound (0: unbounded)')
    out_noise: float = setting(0.0, 'additive output noise std')
    w_noise: float = setting(0.0, "weight read noise std per read (the seed's --fnoise)")

    def __post_init__(self) -> None:
        for name in ("inp_bits", "out_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, int) or not 0 <= bits <= 24:
                raise ValueError(f"{name} must be an integer in 0..24 (0 = ideal converter), got {bits!r}")
        for name in ("out_bound", "out_noise", "w_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.out_bits and not self.out_bound:
            raise ValueError("an ADC (out_bits > 0) needs a range: set out_bound > 0")

    @property
    def ideal(self) -> bool:
        return not (self.inp_bits or self.out_bits or self.out_bound or self.out_noise or self.w_noise)


def quantize(x: Tensor, bits: int, bound: float) -> Tensor:
    """Round to the 2^bits codes of a signed converter spanning ±bound (clipped), gradient passed
    straight through."""
    half = 2 ** (bits - 1)
    step = bound / half
    q = torch.clamp(torch.round(x / step), -half, half - 1) * step
    return x + (q - x).detach()


def clip(x: Tensor, bound: float) -> Tensor:
    return x + (x.clamp(-bound, bound) - x).detach()


def _transformed(t: Tensor) -> bool:
    """Whether ``t`` is being traced by torch.func (jvp/vjp), which needs the straight-through form."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return True if check is None else bool(check(t))


class NoisePool:
    """Pre-drawn standard Gaussians read at a seeded random offset per call.

    Drawing fresh Gaussians costs more than the matrix product itself on a CPU; a window of a large
    pool at a random offset gives exact Gaussian marginals, and two reads share an element at the same
    output position only when their offsets coincide (probability 1/size).
    """

    def __init__(self, generator: torch.Generator, size: int = 1 << 22):
        self.generator = generator
        self.pool = torch.randn(size, generator=generator)
        self._digest: str | None = None

    def fingerprint(self) -> str:
        """sha256 of the pool. A checkpoint stores this instead of the pool (16 MiB at the default
        size): the pool is redrawn from the seed, and the digest proves the redraw is the same."""
        if self._digest is None:
            self._digest = hashlib.sha256(self.pool.numpy().tobytes()).hexdigest()
        return self._digest

    def take(self, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        n = shape.numel()
        if n > self.pool.numel() // 2:  # too big for a window: draw afresh
            return torch.randn(shape, generator=self.generator, dtype=dtype)
        off = int(torch.randint(0, self.pool.numel() - n + 1, (1,), generator=self.generator))
        return self.pool[off : off + n].view(shape).to(dtype)


def analog_linear(
    h: Tensor, weight: Tensor, bias: Tensor | None, io: IOConfig, scale: float, noise: NoisePool
) -> Tensor:
    """``F.linear(h, weight, bias)`` as an analog tile computes it; exactly ``F.linear`` when
    ``io.ideal``. ``scale`` maps conductance to weight (weight = scale·G)."""
    if io.ideal:
        return F.linear(h, weight, bias)
    if torch.is_grad_enabled() or _transformed(h):
        return _analog_linear_ste(h, weight, bias, io, scale, noise)
    # The same arithmetic fused into few in-place passes, for the relaxations (no derivatives needed).
    amax = h.abs().amax(-1, keepdim=True).clamp_min_(1e-12)
    half_in = 2 ** (io.inp_bits - 1) if io.inp_bits else 1
    x = torch.mul(h, half_in / amax)
    if io.inp_bits:
        x.round_().clamp_(-half_in, half_in - 1)
    y = F.linear(x, weight)  # = k·(G x_n) with k = scale·half_in
    k = scale * half_in
    half_out = 2 ** (io.out_bits - 1) if io.out_bits else 1
    step = io.out_bound / half_out if io.out_bits else 1.0
    if io.w_noise:
        xn = torch.linalg.vector_norm(x, dim=-1, keepdim=True) / half_in
        std = torch.sqrt(io.out_noise**2 + (io.w_noise * xn) ** 2)
        y.addcmul_(noise.take(y.shape, y.dtype), std, value=k)
    elif io.out_noise:
        y.add_(noise.take(y.shape, y.dtype), alpha=k * io.out_noise)
    if io.out_bits:
        y.mul_(1.0 / (k * step)).round_().clamp_(-half_out, half_out - 1)
        gain = amax * (step * scale)
    elif io.out_bound:
        y.clamp_(-io.out_bound * k, io.out_bound * k)
        gain = amax * (1.0 / half_in)
    else:
        gain = amax * (1.0 / half_in)
    return y.mul_(gain) if bias is None else torch.addcmul(bias, y, gain)


def _analog_linear_ste(
    h: Tensor, weight: Tensor, bias: Tensor | None, io: IOConfig, scale: float, noise: NoisePool
) -> Tensor:
    amax = h.detach().abs().amax(-1, keepdim=True).clamp_min(1e-12)
    x = h / amax
    if io.inp_bits:
        x = quantize(x, io.inp_bits, 1.0)
    y = F.linear(x, weight) * (1.0 / scale)
    if io.out_noise or io.w_noise:
        std: Tensor | float = io.out_noise
        if io.w_noise:
            norm = torch.linalg.vector_norm(x.detach(), dim=-1, keepdim=True)
            std = torch.sqrt(io.out_noise**2 + (io.w_noise * norm) ** 2)
        y = y + noise.take(y.shape, y.dtype) * std
    if io.out_bits:
        y = quantize(y, io.out_bits, io.out_bound)
    elif io.out_bound:
        y = clip(y, io.out_bound)
    y = y * (amax * scale)
    return y if bias is None else y + bias
