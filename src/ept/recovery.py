"""What keeps a run from losing work: checkpoints (the latest and the best), and the rollback to
the last good state with a lower learning rate when a step diverges."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ept import checkpoint as ckpt
from ept.analog.session import AnalogSession
from ept.runlog import MetricsLog
from ept.session import Session, load_session_state, session_state

NONFINITE_UPDATE = "non-finite weights after the update"
ROLLBACK_HERE = "this checkpoint"  # a checkpoint's rollback point when it is the checkpoint itself


class TrainingDiverged(RuntimeError):
    """Divergence persisted through ``max_rollbacks`` rollbacks; the last good checkpoint stays."""


def rollback(s: Session, snapshot: dict[str, Any], reason: str, metrics: MetricsLog,
             log: Callable[[str], None], devices: AnalogSession | None = None) -> None:
    """Back to the last good state with a lower learning rate; give up after max_rollbacks.

    The replay draws fresh batches (the batch stream is not rewound): a step that failed on the
    very batch after the snapshot would otherwise fail identically however low the learning rate.
    An analog run's devices are reprogrammed toward the snapshot (:meth:`AnalogSession.roll_back`).
    """
    t, failed = s.cfg.train, s.state
    # Before the first update the operator is the initial one, whatever the learning rate: only a
    # fresh batch can change the outcome, so the retries keep the learning rate.
    initial = failed.step == 0 and reason != NONFINITE_UPDATE
    if failed.rollbacks >= t.max_rollbacks:
        if initial:
            raise TrainingDiverged(
                f"the initial operator does not relax: {reason}, on {failed.rollbacks + 1} batches at step 0 "
                f"(the learning rate is not the cause): try --solver broyden (a stiff field), a smaller "
                f"--init_std or a larger damping --c")
        raise TrainingDiverged(f"training diverged at step {failed.step} ({reason}) after {failed.rollbacks} "
                               f"rollbacks: lower --lr or hold contraction (--eigreg 1 --eig_margin 0.5)")
    stream, masks = s.batches.get_state(), s.masks.get_state()
    load_session_state(s, snapshot)
    s.batches.set_state(stream)
    s.masks.set_state(masks)
    s.state.rollbacks = failed.rollbacks + 1
    s.state.best_val = failed.best_val  # best/ on disk stays the best
    s.state.lr_scale = failed.lr_scale * (1.0 if initial else t.lr_backoff)
    backoff = 0.0 if initial or s.controller is None else s.controller.cfg.eig_backoff
    s.state.eig_shift = failed.eig_shift + backoff
    event = {"event": "rollback", "step": failed.step, "to_step": s.state.step, "reason": reason,
             "lr_scale": s.state.lr_scale}
    if s.state.eig_shift:
        event["eig_shift"] = s.state.eig_shift
    devices_note = ""
    if devices is not None:  # after the Session: the model then takes what the reprogrammed devices read
        event["reprogram_writes"] = devices.roll_back(snapshot["devices"])
        devices_note = f", devices reprogrammed with {event['reprogram_writes']} pulses"
    metrics.write(event)
    hold = f", eigreg margin +{s.state.eig_shift:g}" if s.state.eig_shift else ""
    log(f"step {failed.step}: {reason}; rolled back to step {s.state.step}, lr x{s.state.lr_scale:g}{hold}"
        f"{devices_note}")


def rollback_point(s: Session, devices: AnalogSession | None) -> dict[str, Any]:
    """What :func:`rollback` returns to: the Session's state and, in an analog run, the controller's
    record of the devices (:meth:`AnalogSession.rollback_point`)."""
    st = session_state(s)
    if devices is not None:
        st["devices"] = devices.rollback_point()
    return st


def save(s: Session, run: Path, analog: AnalogSession | None = None, best: bool = False,
         rollback: dict[str, Any] | None = None) -> Path:
    """Checkpoint the session into ``run`` (``best``: into ``run/best``, the one checkpoint kept
    there, its val CE in the pointer). ``rollback`` is the state a rollback would return to when it
    is not this one: saved with it, so a resumed run rolls back where the uninterrupted one would."""
    weights = {"model": s.model.state_dict()}
    if s.ema is not None:
        weights["ema"] = s.ema.weights()
    state = session_state(s)
    if analog is not None:
        state["analog"] = analog.state_dict()
    if not best:
        state["rollback"] = ROLLBACK_HERE if rollback is None else rollback
    if best:
        return ckpt.save_checkpoint(run / ckpt.BEST, s.state.step, weights, state, keep=1,
                                    meta={"val_ce": s.state.best_val})
    return ckpt.save_checkpoint(run, s.state.step, weights, state, keep=s.cfg.train.keep)


def note_val(s: Session, val: float, run: Path | None, analog: AnalogSession | None = None) -> None:
    """Record a periodic val CE; a new best is checkpointed into ``run/best``."""
    if not val < s.state.best_val:  # NaN is never a best
        return
    s.state.best_val = float(val)
    if run is not None:
        save(s, run, analog, best=True)


def best_note(run: Path | None) -> str:
    """'; the best model (val CE X at step S) is RUN/best: ...' or '' when the run kept none."""
    best = None if run is None else ckpt.best_pointer(run)
    if best is None or "val_ce" not in best:
        return ""
    return (f"; its best model (val CE {best['val_ce']:.4f} at step {best['step']}) is kept in "
            f"{run / ckpt.BEST}: ept eval --ckpt {run} --best")


