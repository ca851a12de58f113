"""Faults a shared machine does to a run, and what survives them.

    python benchmarks/chaos.py [--kills 20] [--seed 0] [--quick] [--json]

Every run is a short ``ept train`` on a 40k-character corpus that checkpoints every step, so many
kills land inside a save. Against one uninterrupted reference run:

* **kills** — ``kill -9`` at a random moment (start-up, tokenising, a step, a save, the closing
  evaluation), then up to ``--rekills`` more into the recovery; after each kill the newest
  checkpoint must verify with no fallback and no partial checkpoint may be visible (else the
  folder counts as corrupt); the recovery is ``ept train --resume`` (or, where the run never
  checkpointed, the same command again), and the final weights must equal the reference's bit
  for bit.
* **faults** — a flipped byte and a truncated file in the newest checkpoint (``--resume`` falls
  back to the newest intact one), a full disk mid-run (``RLIMIT_FSIZE`` set on the live process:
  exit 1, one line, the previous checkpoint intact), a second writer into a live run's folder
  (exit 2), a pickle in a checkpoint (refused, never run), a NaN gradient and an inf field at a
  chosen step (rolled back, no NaN saved). Each recovered run must again end on the reference's
  weights where the fault leaves the trajectory alone.
* **bad inputs** — each must exit 2 with one line and leave the disk as it was.

``--quick`` (the test suite's form, under a minute) runs 2 kill trials and the full disk, the fault
only a limit on a live process can inject; ``tests/test_faults.py`` covers the rest in-process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ept.testing import tree

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
FLAGS = ["--C", "16", "--H", "2", "--T", "16", "--B", "4", "--vocab_size", "300", "--T1", "2",
         "--t1max", "30", "--t2sel", "10", "--lr", "1e-3", "--warmup", "0", "--steps", str(STEPS),
         "--ckpt_every", "1", "--keep", "2", "--log_every", "1", "--eval_every", "5",
         "--eval_batches", "1", "--sample_tokens", "4", "--threads", "1"]

# A child that trains with a numerical fault at one step (ept.testing's hook, as the tests use it).
_FAULTY_CHILD = """
import sys
import ept.train as tr
from ept.cli import main
from ept.testing import fault_at
tr.step_gradient = fault_at(tr.step_gradient, int(sys.argv[1]), sys.argv[2])
sys.exit(main(sys.argv[3:]))
"""


QUICK_FAULTS = ("full disk",)


class _Payload:
    """Unpickling this would create a file: proof that a load executed code."""

    target = ""

    def __reduce__(self):
        return (open, (self.target, "w"))


@dataclass
class Tally:
    kills_tried: int = 0
    kills_survived: int = 0
    corrupt_folders: int = 0
    faults_injected: int = 0
    faults_recovered: int = 0
    bad_inputs_tried: int = 0
    bad_inputs_refused: int = 0
    failures: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.failures.append(what)


class Bench:
    def __init__(self, work: Path, rng: random.Random, log: Callable[[str], None]):
        self.work, self.rng, self.log = work, rng, log
        self.corpus = work / "plays.txt"
        from ept.data import load_corpus

        self.corpus.write_text(load_corpus(None).valid[:40_000])
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "EPT_CACHE": str(work / "cache"),
                    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        t0 = time.time()
        ref = work / "reference"
        self._check(self.train_cmd(ref), "the reference run")
        self.duration = time.time() - t0
        self.reference = weights(ref)

    # ------------------------------------------------------------------------------- helpers
    def train_cmd(self, run: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "ept", "train", "--data", str(self.corpus), "--out", str(run),
                *FLAGS, *extra]

    def resume_cmd(self, run: Path) -> list[str]:
        return [sys.executable, "-m", "ept", "train", "--resume", str(run)]

    def start(self, cmd: list[str]) -> subprocess.Popen:
        # stderr to a file: a pipe nobody reads could fill and stall the run
        if getattr(self, "stderr", None) is not None:
            self.stderr.close()  # the previous process's: only the last one's is read
        self.stderr = tempfile.TemporaryFile("w+", dir=self.work)
        return subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=self.stderr,
                                text=True, start_new_session=True, preexec_fn=_ignore_sigxfsz)

    def stderr_of_last(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def _check(self, cmd: list[str], what: str) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"chaos: {what} failed (exit {out.returncode}): {out.stderr.strip()[-400:]}")
        return out

    def recover(self, run: Path) -> subprocess.CompletedProcess:
        cmd = self.resume_cmd(run) if (run / "latest.json").is_file() else self.train_cmd(run)
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=False)

    def matches_reference(self, run: Path) -> bool:
        try:
            got = weights(run)
        except Exception:  # noqa: BLE001 — an unloadable folder is a failure, counted by the caller
            return False
        return got.keys() == self.reference.keys() and all(
            torch.equal(got[k], self.reference[k]) for k in got)

    # --------------------------------------------------------------------------------- kills
    def kill_trial(self, n: int, rekills: int, tally: Tally) -> None:
        """One run killed at a random moment, its recovery killed again up to ``rekills`` times
        (each time with probability 1/2), then recovered undisturbed; every kill of the trial
        survives if the folder stayed usable and the run ends on the reference's weights."""
        run = self.work / f"kill{n:03d}"
        cmd, kills, finished = self.train_cmd(run), 0, False
        for _ in range(1 + rekills):
            proc = self.start(cmd)
            wait = self.rng.uniform(0.0, 0.9 * self.duration)
            try:
                finished = proc.wait(timeout=wait) == 0  # done before the kill came
                break
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            kills += 1
            tally.kills_tried += 1
            problem = folder_problem(run)
            if problem:
                tally.corrupt_folders += 1
                tally.fail(f"kill {n}.{kills} after {wait:.2f} s: {problem}")
                return
            cmd = self.resume_cmd(run) if (run / "latest.json").is_file() else self.train_cmd(run)
            if self.rng.random() < 0.5:
                break
        if not finished:
            out = self.recover(run)
            if out.returncode != 0:
                tally.fail(f"kill {n}: recovery exit {out.returncode}: {out.stderr.strip()[-200:]}")
                return
        if not self.matches_reference(run):
            tally.fail(f"kill {n}: final weights differ from the reference after {kills} kills")
            return
        tally.kills_survived += kills

    # -------------------------------------------------------------------------------- faults
    def stopped_run(self, name: str, step: int) -> Path:
        """A run folder checkpointed up to ``step`` (killed after that save)."""
        run = self.work / name
        proc = self.start(self.train_cmd(run))
        deadline = time.time() + 10 * self.duration + 30
        while _latest_step(run) < step and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return run

    def fault(self, tally: Tally, name: str, check: Callable[[], str | None]) -> None:
        tally.faults_injected += 1
        try:
            problem = check()
        except Exception as e:  # noqa: BLE001 — any crash of the check is the fault not recovered
            problem = f"{type(e).__name__}: {e}"
        if problem is None:
            tally.faults_recovered += 1
            self.log(f"fault {name}: recovered")
        else:
            tally.fail(f"fault {name}: {problem}")
            self.log(f"fault {name}: NOT recovered ({problem})")

    def damaged_checkpoint(self, how: str) -> str | None:
        run = self.stopped_run(f"damaged_{how}", 4)
        newest = run / _latest_name(run)
        weights_file = newest / "model.safetensors"
        data = bytearray(weights_file.read_bytes())
        if how == "flip":
            data[len(data) // 2] ^= 0x40
        else:
            del data[len(data) // 2:]
        weights_file.write_bytes(bytes(data))
        out = self.recover(run)
        if out.returncode != 0:
            return f"--resume exit {out.returncode}: {out.stderr.strip()[-200:]}"
        if "skipped" not in out.stderr or newest.name not in out.stderr:
            return "no warning naming the skipped checkpoint"
        return None if self.matches_reference(run) else "final weights differ from the reference"

    def full_disk(self) -> str | None:
        run = self.work / "full_disk"
        proc = self.start(self.train_cmd(run))
        while _latest_step(run) < 3 and proc.poll() is None:
            time.sleep(0.01)
        newest = _latest_name(run)
        limit = max(f.stat().st_size for f in (run / newest).iterdir()) // 2
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
        try:
            proc.wait(timeout=10 * self.duration + 30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return "the run did not stop on a full disk"
        err = self.stderr_of_last()
        lines = [x for x in err.strip().splitlines() if x.startswith("ept ")]
        if proc.returncode != 1 or not lines or str(run) not in lines[-1] or "MB" not in lines[-1]:
            return f"exit {proc.returncode}, last line {lines[-1:] or err.strip()[-200:]!r}"
        problem = folder_problem(run)
        if problem:
            return problem
        out = self.recover(run)
        if out.returncode != 0:
            return f"--resume exit {out.returncode}: {out.stderr.strip()[-200:]}"
        return None if self.matches_reference(run) else "final weights differ from the reference"

    def second_writer(self) -> str | None:
        """A ``--resume`` and a new run into the folder of a live run (made long enough to stay live
        through both attempts) are refused; the live run, then killed, leaves a usable folder."""
        run = self.work / "two_writers"
        first = self.start(self.train_cmd(run, "--steps", "100000"))
        while _latest_step(run) < 2 and first.poll() is None:
            time.sleep(0.01)
        second = subprocess.run(self.resume_cmd(run), env=self.env, capture_output=True, text=True,
                                check=False)
        third = subprocess.run(self.train_cmd(run), env=self.env, capture_output=True, text=True,
                               check=False)
        live = first.poll() is None
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        if not live:
            return f"the first run ended (exit {first.returncode}) before the second writers came"
        if second.returncode != 2 or third.returncode != 2:
            return f"second writers exit {second.returncode} / {third.returncode}, not 2"
        if "live ept train" not in second.stderr:
            return f"the refusal does not say why: {second.stderr.strip()[-200:]}"
        return folder_problem(run)

    def pickle_in_checkpoint(self) -> str | None:
        run = self.stopped_run("pickle", 2)
        newest = run / _latest_name(run)
        _Payload.target = str(self.work / "pwned")
        blob = pickle.dumps({"weight": _Payload()})
        (newest / "model.safetensors").write_bytes(blob)
        manifest = json.loads((newest / "manifest.json").read_text())  # a forger fixes the checksum
        manifest["files"]["model.safetensors"] = {"bytes": len(blob),
                                                  "sha256": hashlib.sha256(blob).hexdigest()}
        (newest / "manifest.json").write_text(json.dumps(manifest))
        out = subprocess.run([sys.executable, "-m", "ept", "eval", "--ckpt", str(newest), "--data",
                              str(self.corpus)], env=self.env, capture_output=True, text=True, check=False)
        if Path(_Payload.target).exists():
            return "loading executed the pickle"
        return None if out.returncode == 2 else f"eval exit {out.returncode}, not 2"

    def numerical(self, kind: str) -> str | None:
        run = self.work / kind
        out = subprocess.run([sys.executable, "-c", _FAULTY_CHILD, "3", kind, *self.train_cmd(run)[3:],
                              "--json"], env=self.env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            return f"exit {out.returncode}: {out.stderr.strip()[-200:]}"
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        if summary["rollbacks"] != 1 or not summary["finished"]:
            return f"rollbacks {summary['rollbacks']}, finished {summary['finished']}"
        from ept.checkpoint import load_checkpoint

        for folder in sorted(run.glob("ckpt-*")) + sorted((run / "best").glob("ckpt-*")):
            for sd in load_checkpoint(folder).weights.values():
                if not all(bool(torch.isfinite(v).all()) for v in sd.values()):
                    return f"a non-finite weight saved in {folder.name}"
        return None

    # ---------------------------------------------------------------------------- bad inputs
    def bad_input(self, tally: Tally, name: str, argv: list[str], watched: Path | None) -> None:
        tally.bad_inputs_tried += 1
        before = tree(watched) if watched is not None and watched.exists() else None
        out = subprocess.run([sys.executable, "-m", "ept", *argv], env=self.env, capture_output=True,
                             text=True, check=False)
        lines = [x for x in out.stderr.strip().splitlines() if x.startswith("ept ")]
        after = tree(watched) if watched is not None and watched.exists() else None
        if out.returncode == 2 and len(lines) == 1 and before == after:
            tally.bad_inputs_refused += 1
            self.log(f"bad input {name}: refused ({lines[0][:90]})")
        else:
            tally.fail(f"bad input {name}: exit {out.returncode}, {len(lines)} error lines, "
                       f"disk {'unchanged' if before == after else 'changed'}")

    def bad_inputs(self, tally: Tally) -> None:
        binary = self.work / "binary.txt"
        binary.write_bytes(bytes(range(256)) * 20)
        tiny = self.work / "tiny.txt"
        tiny.write_text("hello world. " * 400)
        run = self.stopped_run("bad_inputs", 2)
        other = self.work / "bad_other_shape"
        shutil.copytree(run, other)
        edited = self.work / "bad_config"
        shutil.copytree(run, edited)
        cfg = json.loads((edited / "config.json").read_text())
        cfg["solver"]["eps"] = -1.0
        (edited / "config.json").write_text(json.dumps(cfg))
        untok = self.work / "bad_tokenizer"
        shutil.copytree(run, untok)
        (untok / "tokenizer.json").unlink()
        fresh = self.work / "bad_fresh"
        base = ["train", "--data", str(self.corpus), *FLAGS]
        cases = [
            ("non-UTF-8 data", ["train", "--data", str(binary), "--out", str(fresh)], fresh),
            ("corpus too small for the vocabulary", ["train", "--data", str(tiny), "--out", str(fresh),
                                                     "--vocab_size", "4000", "--T", "16"], fresh),
            ("another shape's --init_ckpt", [*base, "--C", "32", "--init_ckpt", str(other),
                                             "--out", str(fresh)], other),
            ("a hand-edited config.json", ["train", "--resume", str(edited)], edited),
            ("a missing tokenizer.json", ["train", "--resume", str(untok)], untok),
            ("eval without tokenizer.json", ["eval", "--ckpt", str(untok), "--data", str(self.corpus)],
             untok),
            ("--resume of a folder with no run", ["train", "--resume", str(self.work / "nothing")], None),
            ("a negative --lr", [*base, "--lr", "-1", "--out", str(fresh)], fresh),
        ]
        for name, argv, watched in cases:
            self.bad_input(tally, name, argv, watched)
        if fresh.exists():
            tally.fail("a refused run left its --out folder behind")


def weights(run: Path) -> dict[str, torch.Tensor]:
    from ept.checkpoint import load_checkpoint

    ck = load_checkpoint(run)
    return {f"{stem}.{k}": v for stem, sd in ck.weights.items() for k, v in sd.items()}


def folder_problem(run: Path) -> str | None:
    """Why the folder a kill left is not usable as it stands (None: it is)."""
    from ept.checkpoint import CheckpointError, load_checkpoint

    if not run.exists() or not (run / "latest.json").is_file():
        return None  # nothing checkpointed yet: the same command starts it again
    try:
        load_checkpoint(run)  # strict: no fallback
    except CheckpointError as e:
        return f"the newest checkpoint does not load: {e}"
    for folder in run.glob("ckpt-*"):
        try:
            load_checkpoint(folder)
        except CheckpointError as e:
            return f"a visible checkpoint is partial: {e}"
    return None


def _latest_name(run: Path) -> str:
    return json.loads((run / "latest.json").read_text())["checkpoint"]


def _latest_step(run: Path) -> int:
    try:
        return int(json.loads((run / "latest.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def _ignore_sigxfsz() -> None:
    """A write past RLIMIT_FSIZE then fails with EFBIG (what a full quota looks like) instead of
    killing the process with SIGXFSZ."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def run(kills: int, rekills: int, seed: int, quick: bool, log: Callable[[str], None]) -> dict:
    tally = Tally()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="ept-chaos-") as tmp:
        bench = Bench(Path(tmp), random.Random(seed), log)
        log(f"reference run: {bench.duration:.1f} s")
        for n in range(kills):
            bench.kill_trial(n, rekills, tally)
            log(f"kills {tally.kills_survived}/{tally.kills_tried} survived, "
                f"{tally.corrupt_folders} corrupt folders")
        faults = {
            "flipped byte": lambda: bench.damaged_checkpoint("flip"),
            "truncated file": lambda: bench.damaged_checkpoint("truncate"),
            "full disk": bench.full_disk,
            "second writer": bench.second_writer,
            "pickle in a checkpoint": bench.pickle_in_checkpoint,
            "NaN gradient": lambda: bench.numerical("grad"),
            "inf field": lambda: bench.numerical("field"),
        }
        for name, check in faults.items():
            if not quick or name in QUICK_FAULTS:
                bench.fault(tally, name, check)
        if not quick:
            bench.bad_inputs(tally)
    return {"benchmark": "chaos", "kills": kills, "rekills": rekills, "seed": seed, "quick": quick,
            "steps": STEPS, **tally.__dict__, "wall_s": round(time.time() - t0, 1),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "commit": _commit()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="kill trials (each 1 + up to --rekills kills)")
    ap.add_argument("--rekills", type=int, default=2, help="most extra kills into a trial's recovery")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--quick", action="store_true", help="2 kill trials, the full disk (the tests' form)")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args(argv)
    kills = 2 if args.quick else args.kills
    record = run(kills, args.rekills, args.seed, args.quick, lambda m: print(m, file=sys.stderr, flush=True))
    print(f"{'kills survived / tried':<28} {record['kills_survived']}/{record['kills_tried']}")
    print(f"{'corrupt folders':<28} {record['corrupt_folders']}")
    print(f"{'faults recovered / injected':<28} {record['faults_recovered']}/{record['faults_injected']}")
    print(f"{'bad inputs refused / tried':<28} {record['bad_inputs_refused']}/{record['bad_inputs_tried']}")
    for f in record["failures"]:
        print(f"FAILED: {f}")
    if args.json:
        print(json.dumps(record))
    return 0 if not record["failures"] else 1


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
