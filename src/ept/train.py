"""The training loop: one step is gradient (EP, BPTT or BP) -> optional control penalties -> update.

Everything a step changes lives in a :class:`Session`; :func:`session_state` turns it into one
nested dict (checkpointed by :mod:`ept.checkpoint`, and kept in memory as the rollback point), so
a resumed run is bit-identical to an uninterrupted one on CPU. An analog run's devices and write
ledger live beside it in an :class:`AnalogSession`, checkpointed with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ept import checkpoint as ckpt
from ept.analog import AnalogConfig, SimulatedSubstrate, WriteLedger, project, run_summary
from ept.analog.session import AnalogSession
from ept.baseline import bp_gradient
from ept.checkpoint import CONFIG_FILE, TOKENIZER_FILE
from ept.config import MODES as MODES  # re-exported: the routes a run trains with
from ept.config import RunConfig, TrainConfig
from ept.data import (
    EVAL_MASK_SEED,
    TokenData,
    get_batch,
    get_mlm_batch,
    mlm_eval_windows,
    save_tokenizer,
    token_chars,
)
from ept.distributed import SINGLE, Group, ParallelConfigError, all_reduce_grads, reduce_stats, shard
from ept.evaluate import Predictor, fill_masks, generate, render_fill, unigram_ce, validation
from ept.grad import gradient
from ept.grad.common import n_targets
from ept.memory import hold_freed_memory
from ept.model import EquilibriumLM
from ept.optim import ParamEMA, decay_left, set_lr, wsd_factor
from ept.plots import plot_curves
from ept.recovery import (  # TrainingDiverged re-exported: what train() raises
    NONFINITE_UPDATE,
    TrainingDiverged,
    best_note,
    note_val,
    rollback,
    rollback_point,
    save,
)
from ept.runlog import METRICS_FILE as METRICS_FILE  # the run folder's name for it, read by callers
from ept.runlog import MetricsLog, contraction_watch, progress_line, warn, window_record
from ept.session import Session, TrainState, build_session, device_of, load_session_state

CURVES_FILE, SAMPLE_FILE = "curves.png", "sample.txt"


def write_run_files(run: Path, cfg: RunConfig, data: TokenData) -> None:
    """A run folder's own files besides checkpoints: the tokenizer and the resolved configuration
    (what eval, generate, fingerprint and ``--resume`` read back)."""
    save_tokenizer(data.tokenizer, run / TOKENIZER_FILE)
    ckpt.write_json(run / CONFIG_FILE, cfg.to_dict())


def grad_options(cfg: RunConfig) -> dict[str, Any]:
    """The ``ept.gradient`` options of the run's route (EP options also feed the diagnostics)."""
    if cfg.train.mode == "bptt":
        return {"T1": cfg.solver.T1, "eps": cfg.solver.eps}
    solver = dataclasses.asdict(cfg.solver)
    solver["solver"] = solver.pop("method")
    return {**solver, **dataclasses.asdict(cfg.ep)}


def ep_options(cfg: RunConfig) -> dict[str, Any]:
    return grad_options(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mode="ep")))


def next_batch(s: Session, data: TokenData) -> tuple[Tensor, Tensor]:
    """The next training batch: (window, next tokens) for an LM; for an MLM (masked window, the
    masked tokens themselves, -100 elsewhere). Every rank draws the whole global batch (so the
    generators stay identical) and keeps its own rows."""
    m, t = s.cfg.model, s.cfg.train
    if m.objective == "mlm":
        idx, targets = get_mlm_batch(data.train, t.B, m.T, s.batches, s.masks, t.mask_rate, m.vocab_size)
    else:
        idx, targets = get_batch(data.train, t.B, m.T, s.batches)
    if s.group.world > 1:
        rows = shard(t.B, s.group)
        idx, targets = idx[rows], targets[rows]
    dev = device_of(t)
    return (idx, targets) if dev.type == "cpu" else (idx.to(dev), targets.to(dev))


def step_gradient(s: Session, idx: Tensor, targets: Tensor) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The route's gradient plus any control penalty's; stats hold floats and bools only.

    Under data parallelism the stats are the global batch's (:func:`ept.distributed.reduce_stats`)
    and the gradient is reduced over ranks: the route's weighted by each rank's share of the kept
    targets, a penalty's (a mean over sequences) by its share of the rows.
    """
    cfg, group = s.cfg, s.group
    if cfg.train.mode == "bp":
        grads, stats = bp_gradient(s.model, idx, targets, cfg.train.layers)
        z_star, kept_targets = None, n_targets(targets)
    else:
        grads, stats = gradient(s.model, idx, targets, route=cfg.train.mode, group=group, **grad_options(cfg))
        z_star = stats.pop("z_star")
        stats.pop("lam", None)
        stats.pop("kept", None)
        kept_targets = stats.pop("kept_targets", n_targets(targets))
    if group.world > 1:
        local = {**stats, "kept_targets": kept_targets}
        stats = reduce_stats(local, group, idx.shape[0], n_targets(targets))
        total = stats.pop("kept_targets")
        if not stats["diverged"]:  # a diverged step is rolled back on every rank: nothing to reduce
            grads = {k: g * (kept_targets / total) for k, g in grads.items()}
    if s.controller is not None and z_star is not None and not stats["diverged"]:
        x = s.model.inject(idx).detach()
        left = decay_left(s.state.step, cfg.train.steps, cfg.train.wsd)
        extra, logs = s.controller.penalty_grads(s.model, x, z_star, stats, left, s.state.step,
                                                 tighten=s.state.eig_shift)
        if group.world > 1:
            share = idx.shape[0] / cfg.train.B
            extra = {k: g * share for k, g in extra.items()}
            logs = reduce_stats(logs, group, idx.shape[0], n_targets(targets))
        grads = {k: g + extra[k] if k in extra else g for k, g in grads.items()}
        stats.update(logs)
    if group.world > 1 and not stats["diverged"]:
        grads = all_reduce_grads(grads, group)
    return grads, stats


def apply_update(model: EquilibriumLM, optimizer: torch.optim.Optimizer, grads: dict[str, Tensor],
                 lr: float, clip: float) -> float:
    """grads -> one optimizer step (the piece an analog substrate replaces); returns the grad norm."""
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.grad = grads[name].detach().to(p.dtype)
    norm = torch.nn.utils.clip_grad_norm_(params.values(), clip if clip > 0 else math.inf)
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def divergence(stats: dict[str, Any], state: TrainState, t: TrainConfig) -> str | None:
    """Why this step must be rolled back, or None. Updates the consecutive-bad-step count."""
    if stats.get("diverged") or not math.isfinite(stats.get("loss", math.nan)):
        phases = [k.removesuffix("_diverged") for k, v in stats.items()
                  if k.endswith("_diverged") and k != "diverged" and v]
        if "free" in phases:  # the later phases were skipped (and report themselves diverged)
            return "the free phase blew up"
        if stats.get("free_unsettled"):
            return (f"no sequence's free phase ended below drop_res (worst residual "
                    f"{stats.get('free_residual_max', math.nan):.3g}): raise --t1max or --drop_res, or try "
                    "another --solver (broyden on a stiff operator)")
        if phases:
            return f"the {' and '.join(phases)} phase{'s' if len(phases) > 1 else ''} blew up"
        return "non-finite loss or gradient"
    # BPTT's model is its T1 unrolled steps, not an equilibrium: a large residual after them is
    # what it trains through (0.1-0.3 on the 800-step tiny run, which the rule rolled back five
    # times and stopped at step 368), not a divergence.
    res = None if t.mode == "bptt" else stats.get("free_residual")
    state.bad_steps = state.bad_steps + 1 if res is not None and not res <= t.div_res else 0
    if state.bad_steps >= t.div_patience:
        return f"free phase stopped converging (residual {res:.3g} > {t.div_res} for {state.bad_steps} steps)"
    return None


def weights_finite(s: Session) -> bool:
    tensors = list(s.model.state_dict().values()) + (list(s.ema.weights().values()) if s.ema else [])
    return all(bool(torch.isfinite(v).all()) for v in tensors)


def eval_model(s: Session) -> Predictor:
    """A model holding the weights evaluation uses (the EMA's when --pema is on)."""
    model = EquilibriumLM(s.cfg.model).to(device_of(s.cfg.train))
    model.load_state_dict(s.ema.weights() if s.ema is not None else s.model.state_dict())
    model.eval()
    return Predictor.for_run(model, s.cfg)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _silent(msg: str) -> None:  # the log of a rank other than 0
    return None


Update = Callable[[EquilibriumLM, torch.optim.Optimizer, dict[str, Tensor], float, float], float]


def _evaluate(s: Session, data: TokenData, max_batches: int | None,
              chars: np.ndarray | None = None) -> dict[str, Any]:
    """Val CE: next-token for an LM, masked-token for an MLM (fixed masks, so evaluations compare);
    ``chars`` adds nats per character. Under data parallelism rank 0 evaluates (the weights are the
    same on every rank) and the others receive its figures."""
    out = None
    if s.group.is_main:
        out = validation(eval_model(s), data.valid, s.cfg, max(s.cfg.train.B, 32), max_batches, chars)
    return s.group.broadcast(out)


def sample_text(s: Session, data: TokenData) -> str:
    """An LM continues the valid split's first tokens; an MLM fills the masks of its first window
    (as evaluation masks it), the predictions in [brackets]."""
    predictor, m = eval_model(s), s.cfg.model
    if m.objective == "mlm":
        inputs, targets = next(mlm_eval_windows(data.valid[: m.T], m.T, 1, s.cfg.train.mask_rate,
                                                m.vocab_size, EVAL_MASK_SEED))
        filled = fill_masks(predictor, inputs)[0].tolist()
        return render_fill(filled, (targets[0] >= 0).tolist(), data.decode)
    prompt = [int(i) for i in data.valid[: min(16, len(data.valid) - 1)]]
    gen = torch.Generator().manual_seed(s.cfg.train.seed)
    ids = generate(predictor, prompt, s.cfg.train.sample_tokens, m.T, 0.8, 40, gen)
    return data.decode(prompt) + data.decode(ids)


def _finish(
    s: Session, data: TokenData, run: Path | None, metrics: MetricsLog, log: Callable[[str], None]
) -> dict[str, Any]:
    """Whole-split val CE, a text sample, the curves PNG."""
    final = _evaluate(s, data, None, token_chars(data.tokenizer))
    metrics.write({"step": s.state.step, "event": "final", **final})
    text = sample_text(s, data) if s.group.is_main else ""
    what = "masked-token CE" if s.cfg.model.objective == "mlm" else "val CE"
    log(f"{what} {final['val_ce']:.4f} over {final['tokens']} tokens; sample:\n{text}")
    if run is not None:
        ckpt.atomic_write(run / SAMPLE_FILE, text.encode())
        plot_curves(metrics.records, run / CURVES_FILE, title=f"{s.cfg.train.mode} {s.cfg.preset}".strip())
    return {**final, "sample": text}


def analog_session(s: Session, analog: AnalogConfig, update: Update | None = None
                   ) -> tuple[Update, Callable[[], Any], AnalogSession]:
    """Put the block's matrices on simulated devices, programmed from the model's present weights:
    the gradient is taken with the analog forward (every matrix–vector product of both phases
    through the periphery), and each optimizer step is programmed into the devices as pulses,
    counted by the write ledger. The devices and their noise are drawn from ``analog.seed`` (0: the
    run's seed), which leaves the initial weights and the data order to the run's seed alone.
    ``update`` is the digital optimizer step whose result is programmed (default :func:`apply_update`)."""
    seed = analog.device_seed(s.cfg.train.seed)
    sub = SimulatedSubstrate(s.model, analog, s.cfg.solver, s.cfg.ep, seed=seed)
    devices = AnalogSession(analog, sub, WriteLedger(), update or apply_update)
    return devices.program, sub.analog_forward, devices


def train(cfg: RunConfig, data: TokenData, run: Path | None = None, *, resume: bool = False,
          init_weights: dict[str, Tensor] | None = None, stop_after: int | None = None,
          log: Callable[[str], None] = _stderr, update: Update | None = None,
          analog: AnalogConfig | None = None, group: Group = SINGLE) -> dict[str, Any]:
    """Train (or, with ``resume``, continue the run in ``run``); returns the run summary.

    ``update`` is the optimizer step (default :func:`apply_update`; in an analog run, the digital
    step whose result is programmed into the devices). ``stop_after`` ends this session after that
    step (checkpointed, as an interruption would);
    the schedule still runs to ``cfg.train.steps``. ``analog`` runs the block on simulated devices
    (EP only; the summary gains the write ledger's figures; checkpoints hold the devices and the
    ledger, so a resume must be given the run's own ``analog``). ``group`` trains data-parallel
    (:mod:`ept.distributed`): each rank takes its slice of the global batch ``cfg.train.B``, the
    ranks agree on every decision, and only rank 0 writes into ``run`` or logs.
    """
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.hold_memory and cfg.train.device == "cpu":
        hold_freed_memory()
    if group.world > 1:
        if analog is not None:
            raise ParallelConfigError("--analog under torchrun is not supported yet: the devices' read "
                                      "noise would differ across ranks; train an analog run in one process")
        shard(cfg.train.B, group)  # refuses a batch the ranks cannot split evenly
        if not group.is_main:
            log = _silent
    out = run if group.is_main else None  # the folder this process writes into
    if analog is not None:
        if not analog.io.ideal:
            # The read and output noise set a floor on the residual (≈0.5 with aihwkit's periphery),
            # so only non-finite values roll an analog run back, and no sequence is dropped from EP.
            cfg.train = dataclasses.replace(cfg.train, div_res=math.inf)
            cfg.ep = dataclasses.replace(cfg.ep, drop_res=math.inf)
    s, t = build_session(cfg, group), cfg.train
    if init_weights is not None and not resume:
        # Before the devices: they are programmed from the weights the run starts from.
        ckpt.load_weights_into(s.model, init_weights, "--init_ckpt")
    # Looked up at call time, not bound as a default, so a substituted module-level step is used.
    update = update or apply_update
    forward, devices = contextlib.nullcontext, None
    saved_rollback: Any = None  # a resumed checkpoint's rollback point, when it is not the checkpoint
    if analog is not None:
        update, forward, devices = analog_session(s, analog, update)
    if resume:
        loaded = ckpt.load_checkpoint(run, fallback=lambda msg: log(f"warning: {msg}"))
        if devices is None and loaded.state.get("analog") is not None:
            raise ckpt.CheckpointError(
                f"checkpoint '{loaded.path}' holds the devices of an analog run but is resumed without its "
                "analog settings: resume with 'ept train --resume', which reads them from its config.json")
        load_session_state(s, loaded.state)
        if devices is not None:  # after the Session: it puts the devices' weights back into the model
            devices.load_state_dict(loaded.state.get("analog"), str(loaded.path))
        saved_rollback = loaded.state.get("rollback")
        log(f"resuming {run} at step {s.state.step}/{t.steps}")
    elif s.ema is not None and (init_weights is not None or devices is not None):
        # Average from the weights the run starts from (the warm start, as the devices read it), not
        # from the random init the EMA was built on.
        s.ema = ParamEMA(s.model, t.pema)
    metrics = MetricsLog(out, s.state.step if resume else None)
    diagnose = None
    if t.diag_cos > 0:
        from ept.diagnostics import hopf_warning
        from ept.diagnostics import training_diagnostics as diagnose
    watch = contraction_watch(cfg, metrics.records)
    first_val = last_val = None
    if not resume:
        first = _evaluate(s, data, t.eval_batches)
        first_val = last_val = first["val_ce"]
        metrics.write({"step": 0, **first})
        note_val(s, first_val, out, devices)
    snapshot, base_seconds, t0 = rollback_point(s, devices), s.state.seconds, time.time()
    snapshot_step = s.state.step
    if isinstance(saved_rollback, dict):
        snapshot, snapshot_step = saved_rollback, -1  # older than the checkpoint: where the run would return
    window: list[dict[str, Any]] = []
    tick, tick_step = time.time(), s.state.step
    end = t.steps if stop_after is None else min(t.steps, stop_after)
    while s.state.step < end:
        idx, targets = next_batch(s, data)
        with forward():
            grads, stats = step_gradient(s, idx, targets)
        reason = divergence(stats, s.state, t)
        lr = t.lr * s.state.lr_scale * wsd_factor(s.state.step, t.steps, t.warmup, t.wsd)
        if reason is None:
            stats["grad_norm"] = update(s.model, s.optimizer, grads, lr, t.clip)
            reason = None if weights_finite(s) else NONFINITE_UPDATE
        if reason is not None:
            try:
                rollback(s, snapshot, reason, metrics, log, devices)
            except TrainingDiverged as e:
                raise TrainingDiverged(f"{e}{best_note(run)}") from None
            window.clear()
            tick, tick_step = time.time(), s.state.step
            continue
        if s.ema is not None:
            s.ema.update(s.model)
        s.state.step += 1
        step = s.state.step
        window.append(stats)
        if diagnose is not None and step % t.diag_cos == 0 and group.is_main:
            diag = {"step": step, "event": "diag", **diagnose(s.model, idx, targets, ep_options(cfg))}
            metrics.write(diag)
            warn(watch, diag, metrics, log)
            warning = hopf_warning([r for r in metrics.records if r.get("event") == "diag"])
            if warning:
                metrics.write({"step": step, "event": "hopf_warning", "message": warning})
                log(f"step {step}: {warning}")
        if step % t.eval_every == 0 or step == t.steps:
            last_val = _evaluate(s, data, t.eval_batches)["val_ce"]
            metrics.write({"step": step, "val_ce": last_val})
            note_val(s, last_val, out, devices)
        if step % t.log_every == 0 or step == end:
            rec = window_record(window, step, lr, (step - tick_step) / max(time.time() - tick, 1e-9))
            metrics.write(rec)
            log(progress_line(rec, t.steps, last_val))
            warn(watch, rec, metrics, log)
            window.clear()
            tick, tick_step = time.time(), step
        if step % t.log_every == 0 and s.state.bad_steps == 0:
            snapshot, snapshot_step = rollback_point(s, devices), step  # recent, with a converging free phase
        if step % t.ckpt_every == 0 or step == end:
            s.state.seconds = base_seconds + time.time() - t0
            if out is not None:
                save(s, out, devices, rollback=None if snapshot_step == step else snapshot)
    s.state.seconds = base_seconds + time.time() - t0
    summary = {
        "steps": s.state.step, "seconds": round(s.state.seconds, 2), "val_ce": last_val,
        "initial_val_ce": first_val, "rollbacks": s.state.rollbacks, "finished": s.state.step >= t.steps,
        "train_loss": next((r["loss"] for r in reversed(metrics.records) if "loss" in r), None),
    }
    if summary["finished"]:
        final = _finish(s, data, out, metrics, log)
        summary.update(val_ce=final["val_ce"], tokens=final["tokens"], sample=final["sample"],
                       nats_per_char=final["nats_per_char"],
                       unigram_ce=unigram_ce(data.train, data.valid, data.vocab_size))
    if devices is not None:
        summary.update(run_summary(devices.ledger))
        if devices.ledger.steps:  # no step, no rate to project
            log(project(devices.ledger.summary(), devices.ledger.steps)["verdict"])
    summary["model"] = s.model
    return summary
