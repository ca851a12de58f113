"""``ept train / eval / generate`` end to end on a small corpus, and every bad input the issue lists:
one clear line on stderr, exit code 2, nothing overwritten."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import write_corpus

from ept.cli import build_parser, main
from ept.cli.run_folder import seed_run_folder
from ept.presets import resolve

CANONICAL = (
    "--mode ep --attn_mode thick --B 24 --C 512 --H 16 --T 256 --c 1.0 --jacreg 0.1 --jr_floor 0.1 "
    "--jr_max 16 --holo 2 --hr 0.02 --t2sel 80 --track --pema 0.999 --t1max 150 --res_est 1e-4 "
    "--resreg 0.2 --qknorm --T1 150 --T2 20 --lr 6e-4 --wsd 0.25 --steps 32000 "
    "--data data/tinystories_bpe --ckpt runs/myrun.pt --state runs/myrun.state"
).split()
SMALL = [
    "--C",
    "16",
    "--H",
    "2",
    "--T",
    "16",
    "--B",
    "4",
    "--steps",
    "4",
    "--vocab_size",
    "300",
    "--T1",
    "2",
    "--t1max",
    "30",
    "--t2sel",
    "10",
    "--lr",
    "1e-3",
    "--warmup",
    "0",
    "--eval_every",
    "2",
    "--ckpt_every",
    "2",
    "--log_every",
    "2",
    "--eval_batches",
    "1",
    "--sample_tokens",
    "4",
    "--threads",
    "1",
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus_file) -> Path:
    run = tmp_path_factory.mktemp("runs") / "r1"
    assert main(["train", "--data", str(corpus_file), "--out", str(run), *SMALL]) == 0
    return run


def _usage_error(capsys, argv: list[str], *words: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error message"
    line = err[-1]
    assert line.startswith(f"ept {argv[0]}: error: ")
    for w in words:
        assert w in line, (w, line)
    return line


def test_canonical_recipe_parses_verbatim() -> None:
    args = build_parser().parse_args(["train", *CANONICAL])
    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    assert flags["holo"] == 2 and flags["track"] is True and flags["T2"] == 20 and flags["steps"] == 32000
    assert seed_run_folder(flags["ckpt"], flags["state"]) == Path("runs/myrun")
    cfg = resolve("tiny", {k: v for k, v in flags.items() if k not in ("ckpt", "state", "json")})
    assert (cfg.model.C, cfg.model.H, cfg.model.T, cfg.train.B) == (512, 16, 256, 24)
    assert cfg.ep.asym == "track" and cfg.ep.t2sel == 80 and cfg.ep.T2 is None
    assert cfg.control["jacreg"] == 0.1 and cfg.data.data == "data/tinystories_bpe"


def test_solver_nudge_and_control_knobs_are_flags_that_reach_their_configs() -> None:
    argv = ["train", "--lam", "1e-3", "--accel_from", "0.05", "--restart", "5", "--stall", "8",
            "--proj_every", "3", "--proj_jump", "4",
            "--nudge_solver", "fixed_point", "--nudge_m", "3", "--nudge_lam", "1e-5", "--retry_hr", "0.5",
            "--drop_res", "0.05", "--polish_res", "1e-7", "--polish_max", "12",
            "--jacreg", "0.1", "--jr_target", "1e-3", "--jr_up", "1.5", "--jr_decay", "0.8", "--hutch", "2",
            "--eig_iters", "4"]
    parsed = vars(build_parser().parse_args(argv))
    cfg = resolve("tiny", {k: v for k, v in parsed.items() if k not in ("func", "command", "json")})
    s, ep = cfg.solver, cfg.ep
    assert (s.lam, s.accel_from, s.restart, s.stall) == (1e-3, 0.05, 5.0, 8)
    assert (s.proj_every, s.proj_jump) == (3, 4.0)
    assert (ep.nudge_solver, ep.nudge_m, ep.nudge_lam) == ("fixed_point", 3, 1e-5)
    assert (ep.retry_hr, ep.drop_res) == (0.5, 0.05)
    assert (ep.polish_res, ep.polish_max) == (1e-7, 12)
    c = cfg.control
    assert (c["jr_target"], c["jr_up"], c["jr_decay"], c["hutch"], c["eig_iters"]) == (1e-3, 1.5, 0.8, 2, 4)


def test_train_writes_a_complete_run_folder(trained_run: Path, capsys) -> None:
    names = {p.name for p in trained_run.iterdir()}
    assert {
        "config.json",
        "tokenizer.json",
        "metrics.jsonl",
        "curves.png",
        "sample.txt",
        "latest.json",
    } <= names
    assert (trained_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((trained_run / "config.json").read_text())
    assert cfg["model"]["C"] == 16 and cfg["train"]["steps"] == 4 and cfg["data"]["key"]
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert logged and all({"T1", "T2", "free_residual", "it_s", "lr"} <= r.keys() for r in logged)
    assert any(r.get("event") == "final" and r["val_ce"] > 0 for r in records)


def test_json_summary_is_the_last_line(tmp_path, corpus_file, capsys) -> None:
    out = tmp_path / "run"
    assert (
        main(["train", "--data", str(corpus_file), "--out", str(out), *SMALL, "--mode", "bp", "--json"]) == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["seconds"] > 0 and summary["val_ce"] > 0 and summary["finished"]
    assert summary["unigram_ce"] > 0 and summary["initial_val_ce"] > 0


def test_eval_and_generate_use_the_runs_tokenizer(trained_run: Path, corpus_file, capsys) -> None:
    assert main(["eval", "--ckpt", str(trained_run), "--data", str(corpus_file), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"val_ce", "tokens", "nats_per_char"} and 0 < out["val_ce"] < 7
    assert out["tokens"] > 1000
    assert 0 < out["nats_per_char"] < out["val_ce"]  # several characters per token
    assert (
        main(["generate", "--ckpt", str(trained_run), "--prompt", "ROMEO:", "--tokens", "5", "--json"]) == 0
    )
    gen = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert gen["tokens"] == 5 and gen["prompt"] == "ROMEO:"


def test_eval_and_generate_take_the_best_checkpoint_with_best(trained_run: Path, corpus_file, capsys,
                                                             tmp_path) -> None:
    pointer = json.loads((trained_run / "best" / "latest.json").read_text())
    assert main(["eval", "--ckpt", str(trained_run), "--data", str(corpus_file), "--best"]) == 0
    assert f"best checkpoint, step {pointer['step']}," in capsys.readouterr().out
    assert main(["generate", "--ckpt", str(trained_run), "--best", "--tokens", "3"]) == 0
    bare = tmp_path / "bare"
    bare.mkdir()
    _usage_error(capsys, ["eval", "--ckpt", str(bare), "--data", str(corpus_file), "--best"], "no best")


def test_seed_spelling_state_resumes_and_steps_extend(trained_run: Path, tmp_path, capsys) -> None:
    run = tmp_path / "myrun"
    shutil.copytree(trained_run, run)
    argv = [
        "train",
        "--ckpt",
        str(tmp_path / "myrun.pt"),
        "--state",
        str(tmp_path / "myrun.state"),
        "--steps",
        "6",
        "--json",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 6 and summary["run"] == str(run)


def test_resume_may_change_steps_and_threads_and_nothing_else(trained_run: Path, tmp_path, capsys) -> None:
    import torch

    run = tmp_path / "more"
    shutil.copytree(trained_run, run)
    _usage_error(capsys, ["train", "--resume", str(run), "--lr", "0.1"], "--lr cannot change when resuming")
    before = torch.get_num_threads()
    try:
        assert main(["train", "--resume", str(run), "--steps", "6", "--threads", "1", "--json"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 6


@pytest.mark.parametrize(
    "flag, value, word",
    [
        ("--B", "0", "--B"),
        ("--T", "-4", "--T"),
        ("--lr", "0", "--lr"),
        ("--T1", "0", "--T1"),
        ("--proj_jump", "-1", "proj_jump"),
        ("--preset", "huge", "unknown preset"),
    ],
)
def test_bad_values_are_one_line_exit_2(capsys, tmp_path, flag, value, word, corpus_file) -> None:
    out = tmp_path / "never"
    _usage_error(capsys, ["train", "--data", str(corpus_file), "--out", str(out), flag, value], word)
    assert not out.exists()


def test_unknown_flag_exits_2(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--lrr", "1e-3"])
    assert e.value.code == 2 and "--lrr" in capsys.readouterr().err


def test_bad_data_files(capsys, tmp_path) -> None:
    _usage_error(
        capsys,
        ["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "a")],
        "does not exist",
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    _usage_error(capsys, ["train", "--data", str(empty), "--out", str(tmp_path / "b")], "empty")
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be: that is the question.\n" * 3)
    _usage_error(
        capsys,
        ["train", "--data", str(short), "--out", str(tmp_path / "c"), "--T", "64", "--vocab_size", "257"],
        "T=64",
    )
    _usage_error(capsys, ["eval", "--ckpt", str(tmp_path), "--data", str(empty)], "holds no checkpoint")


def test_output_folder_with_another_run_is_refused_untouched(trained_run: Path, capsys, corpus_file) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in trained_run.rglob("*")}
    _usage_error(
        capsys,
        ["train", "--data", str(corpus_file), "--out", str(trained_run), *SMALL],
        "holds another run",
        "--resume",
    )
    assert before == {p.name: p.stat().st_mtime_ns for p in trained_run.rglob("*")}


def test_unwritable_output_folder(capsys, tmp_path, monkeypatch) -> None:
    import ept.cli.run_folder as run_folder

    def denied(*_a, **_k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_folder.tempfile, "TemporaryFile", denied)
    _usage_error(capsys, ["train", "--out", str(tmp_path / "ro")], "not writable")


def test_resume_of_a_folder_without_a_run(capsys, tmp_path) -> None:
    _usage_error(capsys, ["train", "--resume", str(tmp_path)], "holds no ept run")


def test_checkpoint_from_another_config_or_vocabulary(
    trained_run: Path, capsys, tmp_path, corpus_file
) -> None:
    small = [a for a in SMALL]
    small[small.index("--C") + 1] = "32"
    _usage_error(
        capsys,
        [
            "train",
            "--data",
            str(corpus_file),
            "--out",
            str(tmp_path / "w"),
            *small,
            "--init_ckpt",
            str(trained_run),
        ],
        "another model config",
    )
    other_vocab = [a for a in SMALL]
    other_vocab[other_vocab.index("--vocab_size") + 1] = "320"
    _usage_error(
        capsys,
        [
            "train",
            "--data",
            str(corpus_file),
            "--out",
            str(tmp_path / "v"),
            *other_vocab,
            "--init_ckpt",
            str(trained_run),
        ],
        "another corpus or vocabulary",
    )


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_checkpoint_on_resume_and_eval(
    trained_run: Path, capsys, tmp_path, damage, corpus_file
) -> None:
    """Every checkpoint damaged: nothing intact to fall back to (tests/test_faults.py falls back)."""
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    for weights in run.glob("ckpt-*/model.safetensors"):
        data = bytearray(weights.read_bytes())
        if damage == "truncate":
            data = data[:100]
        else:
            data[len(data) // 2] ^= 0x55
        weights.write_bytes(bytes(data))
    line = _usage_error(capsys, ["train", "--resume", str(run)], "model.safetensors")
    assert "earlier ckpt-*" in line
    _usage_error(
        capsys, ["eval", "--ckpt", str(run), "--data", str(corpus_file), "--raw"], "model.safetensors"
    )
    assert len(weights.read_bytes()) == len(data)  # nothing was rewritten
