"""The GPU fast path's flags on CPU: a bf16 free phase keeps EP's gradient, --device cuda refuses
cleanly where there is no GPU."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from ept.cli import main
from ept.grad import gradient
from ept.grad.common import free_phase
from ept.model import EquilibriumLM
from ept.presets import resolve
from ept.train import grad_options

pytestmark = pytest.mark.usefixtures("one_thread")


def _cos(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a)
    na = sum(float(a[k].double().norm() ** 2) for k in a) ** 0.5
    nb = sum(float(b[k].double().norm() ** 2) for k in b) ** 0.5
    return dot / (na * nb)


def test_bf16_free_phase_keeps_the_ep_gradient_against_the_float64_implicit_one():
    cfg = resolve("tiny", {"C": 32, "H": 2, "T": 16, "vocab_size": 512})
    torch.manual_seed(0)
    model = EquilibriumLM(cfg.model)
    idx, targets = torch.randint(0, 512, (4, 16)), torch.randint(0, 512, (4, 16))
    exact, _ = gradient(copy.deepcopy(model).double(), idx, targets, route="implicit", solver="anderson",
                        res_est=1e-12, t1max=500)
    opts = {**grad_options(cfg), "dtype": "bf16"}
    grads, stats = gradient(model, idx, targets, route="ep", **opts)
    assert not stats["diverged"] and stats["dropped_seqs"] == 0
    assert _cos(grads, exact) >= 0.99  # measured 0.9999999999: the float32 polish refines z*
    # The free phase did run in bf16: asked for 1e-7, float32 gets there and bf16 stalls at its floor.
    x = model.inject(idx).detach()
    for dtype, floor in (("float32", False), ("bf16", True)):
        _, st = free_phase(model, x, dataclasses.replace(cfg.solver, res_est=1e-7, t1max=200, dtype=dtype))
        assert (st.residual_max > 1e-6) == floor, (dtype, st.residual_max)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_one_line_exit_2(tmp_path, capsys):
    assert main(["train", "--device", "cuda", "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "use --device cpu" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_an_unknown_dtype_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--dtype", "float16", "--steps", "1"])
    assert e.value.code == 2
    assert "float16" in capsys.readouterr().err
