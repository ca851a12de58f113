"""A training run's state: the :class:`Session` a step changes, and its one nested dict.

:func:`session_state` is what a checkpoint holds and what a rollback returns to; loading it back
(:func:`load_session_state`) makes a resumed run bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from ept.config import ControlConfig, RunConfig, TrainConfig
from ept.distributed import SINGLE, Group, shard
from ept.model import EquilibriumLM
from ept.optim import ParamEMA, build_optimizer


@dataclass
class TrainState:
    step: int = 0
    lr_scale: float = 1.0  # lowered by each rollback
    rollbacks: int = 0
    bad_steps: int = 0  # consecutive steps whose free phase missed div_res
    seconds: float = 0.0  # training wall time over all sessions of the run
    best_val: float = math.inf  # the best periodic val CE so far (its checkpoint and step: RUN/best)
    eig_shift: float = 0.0  # added to eigreg's margin by the rollbacks (--eig_backoff)


@dataclass
class Session:
    cfg: RunConfig
    model: EquilibriumLM
    optimizer: torch.optim.Optimizer
    ema: ParamEMA | None
    controller: Any  # ept.controls.Controller or None
    batches: torch.Generator
    state: TrainState
    masks: torch.Generator  # the masked positions of an MLM run's batches (drawn apart from the windows)
    group: Group = SINGLE  # data parallelism: this rank's slice of each global batch


def device_of(t: TrainConfig) -> torch.device:
    """The run's device: under torchrun each rank's own GPU (LOCAL_RANK)."""
    if t.device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def build_session(cfg: RunConfig, group: Group = SINGLE) -> Session:
    torch.manual_seed(cfg.train.seed)
    t = cfg.train
    model = EquilibriumLM(cfg.model).to(device_of(t))
    optimizer = build_optimizer(t.optimizer, model, t.lr, t.weight_decay)
    ema = ParamEMA(model, t.pema) if t.pema > 0 else None
    controller = None
    if any(float(v) > 0 for k, v in cfg.control.items() if k in ("resreg", "jacreg", "eigreg")):
        from ept.controls import Controller  # only runs that use a control need it

        rows = shard(t.B, group) if group.world > 1 else None
        controller = Controller(ControlConfig.from_dict(cfg.control), group, rows, t.B)
    batches = torch.Generator().manual_seed(t.seed + 1)
    masks = torch.Generator().manual_seed(t.seed + 2)
    return Session(cfg, model, optimizer, ema, controller, batches, TrainState(), masks, group)


def session_state(s: Session) -> dict[str, Any]:
    """Everything a step changes, as one nested dict of tensors and plain values."""
    return {
        "train": dataclasses.asdict(s.state),
        "model": {k: v.detach().clone() for k, v in s.model.state_dict().items()},
        "optimizer": copy.deepcopy(s.optimizer.state_dict()),
        "ema": None if s.ema is None else copy.deepcopy(s.ema.state_dict()),
        "controller": None if s.controller is None else copy.deepcopy(s.controller.state_dict()),
        "rng": {"batches": s.batches.get_state(), "torch": torch.get_rng_state(),
                "masks": s.masks.get_state()},
    }


def load_session_state(s: Session, st: dict[str, Any]) -> None:
    s.state = TrainState(**st["train"])
    s.model.load_state_dict(st["model"])
    s.optimizer.load_state_dict(copy.deepcopy(st["optimizer"]))
    if s.ema is not None and st.get("ema") is not None:
        s.ema.load_state_dict(st["ema"])
    if s.controller is not None and st.get("controller") is not None:
        s.controller.load_state_dict(copy.deepcopy(st["controller"]))
    s.batches.set_state(st["rng"]["batches"])
    if "masks" in st["rng"]:  # a checkpoint from before --objective mlm holds none (an LM draws no mask)
        s.masks.set_state(st["rng"]["masks"])
    torch.set_rng_state(st["rng"]["torch"])


