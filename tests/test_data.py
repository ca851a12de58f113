"""Tests for ept.data: corpora, tokenizer, token cache, batches, and the DataError messages."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ept import data
from ept.data import EOT, Corpus, DataError

FIXTURE = Path(__file__).parent / "fixtures" / "tinystories_sample.txt"
VOCAB = 300


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # Never touch the real ~/.cache/ept.
    monkeypatch.setenv("EPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory) -> Corpus:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EPT_CACHE", str(tmp_path_factory.mktemp("cache")))
        return data.load_corpus(None)


@pytest.fixture(scope="module")
def small_tok(shakespeare):
    return data.train_tokenizer(shakespeare.train[:300_000], 512)


def _small_corpus(shakespeare: Corpus, cache: Path) -> Corpus:
    return Corpus(shakespeare.train[:60_000], shakespeare.valid[:8_000], "slice", cache)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and ": " in msg  # one line: problem, then the fix
    return msg


# ---------------------------------------------------------------------------------------- corpora


def test_embedded_corpus_is_split_by_work(shakespeare, tmp_path):
    assert len(shakespeare.train) == 4_450_298 and len(shakespeare.valid) == 231_092
    assert shakespeare.valid.startswith("JULIUS CAESAR")
    assert "TWELFTH NIGHT" in shakespeare.valid and "MALVOLIO." in shakespeare.valid
    assert "ROMEO AND JULIET" in shakespeare.train and "KING LEAR" in shakespeare.train
    for held_out in ("JULIUS CAESAR", "CASSIUS.", "TWELFTH NIGHT", "MALVOLIO."):
        assert held_out not in shakespeare.train
    assert "Shakespeare" in shakespeare.source
    assert data.load_corpus(None).cache_dir == tmp_path / "cache"


def test_embedded_cache_defaults_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("EPT_CACHE")
    assert data.load_corpus(None).cache_dir == tmp_path / "home" / ".cache" / "ept"


def test_tinystories_file_is_split_into_stories(tmp_path):
    f = tmp_path / "stories.txt"
    shutil.copy(FIXTURE, f)
    c = data.load_corpus(f)
    # 5 stories: the last one (at least one) is held out; each story ends with the marker.
    assert c.train.count(EOT) == 4 and c.valid.count(EOT) == 1
    assert c.train.startswith("Once upon a time there was a little boy named Ben.")
    assert c.valid.startswith("Once upon a time, in a small house")
    assert c.valid.endswith("they could play together." + EOT)
    assert "4 train / 1 valid" in c.source
    td = data.prepare(c, VOCAB)
    assert int((td.train == td.eot_id).sum()) == 4 and int((td.valid == td.eot_id).sum()) == 1
    assert td.train[-1] == td.eot_id and td.decode(td.train) == c.train


def test_plain_file_holds_out_last_lines(tmp_path):
    text = "".join(f"line {i} of the plain text corpus\n" for i in range(400))
    f = tmp_path / "plain.txt"
    f.write_text(text)
    c = data.load_corpus(f)
    assert c.train + c.valid == text
    assert c.train.endswith("\n") and c.valid.startswith("line ")
    assert 0.04 < len(c.valid) / len(text) < 0.06
    assert EOT not in c.train


def test_folder_layouts(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "train.txt").write_text("the train text\n" * 50)
    (a / "val.txt").write_text("the valid text\n" * 5)
    c = data.load_corpus(a)
    assert c.train == "the train text\n" * 50 and c.valid == "the valid text\n" * 5
    assert "train.txt / val.txt" in c.source

    b = tmp_path / "b"  # TinyStories release file names
    b.mkdir()
    shutil.copy(FIXTURE, b / "TinyStories-train.txt")
    (b / "TinyStories-valid.txt").write_text(f"A short story.\n{EOT}\nAnother one.\n{EOT}\n")
    c = data.load_corpus(b)
    assert c.train.count(EOT) == 5 and c.valid == f"A short story.{EOT}Another one.{EOT}"

    only = tmp_path / "only"  # a train file alone is split like a single file
    only.mkdir()
    shutil.copy(FIXTURE, only / "train.txt")
    c = data.load_corpus(only)
    assert c.train.count(EOT) == 4 and c.valid.count(EOT) == 1


def test_cache_dir_beside_data_or_home(monkeypatch, tmp_path):
    monkeypatch.delenv("EPT_CACHE")
    d = tmp_path / "mydata"
    d.mkdir()
    shutil.copy(FIXTURE, d / "s.txt")
    assert data.load_corpus(d / "s.txt").cache_dir == d / ".ept_cache"

    def refuse(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(data.tempfile, "TemporaryFile", refuse)  # a read-only data folder
    assert data.load_corpus(d / "s.txt").cache_dir == tmp_path / "home" / ".cache" / "ept"
    monkeypatch.setenv("EPT_CACHE", str(tmp_path / "elsewhere"))
    assert data.load_corpus(d / "s.txt").cache_dir == tmp_path / "elsewhere"


# -------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips(small_tok, shakespeare):
    assert small_tok.get_vocab_size() == 512
    td = data.TokenData(small_tok, np.zeros(0), np.zeros(0), 512, small_tok.token_to_id(EOT), "k")
    for s in (shakespeare.valid[:20_000], "naïve café — 日本語 🙂\r\n\ttabs  and   spaces" + EOT + "x\n\n"):
        ids = td.encode(s)
        assert td.decode(ids) == s
        assert td.decode(torch.tensor(ids)) == s
    assert td.encode(f"a{EOT}b").count(td.eot_id) == 1  # the marker is one token, never split


def test_tokenizer_is_deterministic(shakespeare):
    text = shakespeare.train[:80_000]
    assert data.train_tokenizer(text, 400).to_str() == data.train_tokenizer([text], 400).to_str()


def test_chunked_encoding_matches_whole_text(small_tok, shakespeare, monkeypatch):
    # Corpora are encoded in chunks for speed and memory; the cuts must not change a single id.
    text = shakespeare.valid[:30_000] + " x  y\n\n z 'll 42 ...!\n" + EOT + "\nOnce upon a time" + EOT
    monkeypatch.setattr(data, "_CHUNK_CHARS", 7)
    monkeypatch.setattr(data, "_BATCH_CHARS", 500)
    td = data.TokenData(small_tok, np.zeros(0), np.zeros(0), 512, small_tok.token_to_id(EOT), "k")
    assert td.encode(text) == small_tok.encode(text).ids


def test_save_and_load_tokenizer(small_tok, tmp_path):
    path = tmp_path / "run" / "tokenizer.json"
    data.save_tokenizer(small_tok, path)
    assert data.load_tokenizer(path).to_str() == small_tok.to_str()
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left
    with pytest.raises(DataError) as e:
        data.load_tokenizer(tmp_path / "nope.json")
    assert "nope.json" in _one_line(e)


# ------------------------------------------------------------------------------------------ cache


def test_prepare_writes_and_reuses_cache(shakespeare, tmp_path, monkeypatch):
    corpus = _small_corpus(shakespeare, tmp_path / "c")
    td = data.prepare(corpus, VOCAB)
    k = td.key[:16]
    names = {f"tokenizer-{k}-v{VOCAB}.json", f"train-{k}-v{VOCAB}.bin", f"valid-{k}-v{VOCAB}.bin"}
    assert {p.name for p in corpus.cache_dir.iterdir()} == names
    assert isinstance(td.train, np.memmap) and td.train.dtype == np.uint16
    assert td.vocab_size == VOCAB and td.train.max() < VOCAB
    assert td.decode(td.valid) == corpus.valid
    mtimes = {p.name: p.stat().st_mtime_ns for p in corpus.cache_dir.iterdir()}

    def no_training(*_a, **_k):
        raise AssertionError("tokenizer retrained although it is cached")

    monkeypatch.setattr(data, "train_tokenizer", no_training)
    again = data.prepare(corpus, VOCAB)
    assert again.key == td.key and np.array_equal(again.train, td.train)
    assert {p.name: p.stat().st_mtime_ns for p in corpus.cache_dir.iterdir()} == mtimes

    # An interrupted run may leave a token file missing: it is rebuilt from the cached tokenizer.
    (corpus.cache_dir / f"valid-{k}-v{VOCAB}.bin").unlink()
    assert np.array_equal(data.prepare(corpus, VOCAB).valid, td.valid)


def test_interrupted_prepare_leaves_no_partial_file(shakespeare, tmp_path, monkeypatch):
    corpus = _small_corpus(shakespeare, tmp_path / "c")
    real = data._encode_batches

    def dies_midway(tok, text, dtype):
        it = real(tok, text, dtype)
        yield next(it)
        raise KeyboardInterrupt  # e.g. Ctrl-C while the token file is being written

    monkeypatch.setattr(data, "_encode_batches", dies_midway)
    monkeypatch.setattr(data, "_BATCH_CHARS", 4096)  # several batches, so the write is cut in the middle
    with pytest.raises(KeyboardInterrupt):
        data.prepare(corpus, VOCAB)
    left = [p.name for p in corpus.cache_dir.iterdir()]
    assert len(left) == 1 and left[0].startswith("tokenizer-")  # no partial .bin, no temp file
    monkeypatch.setattr(data, "_encode_batches", real)
    td = data.prepare(corpus, VOCAB)
    assert td.decode(td.train) == corpus.train and td.decode(td.valid) == corpus.valid


def test_cache_key_depends_on_text_and_vocab(shakespeare, tmp_path):
    corpus = _small_corpus(shakespeare, tmp_path / "c")
    k1 = data.prepare(corpus, VOCAB).key
    k2 = data.prepare(corpus, VOCAB + 20).key
    k3 = data.prepare(Corpus(corpus.train, corpus.valid + "!", "x", corpus.cache_dir), VOCAB).key
    assert len({k1, k2, k3}) == 3
    assert len(list(corpus.cache_dir.glob("tokenizer-*.json"))) == 3


# ---------------------------------------------------------------------------------------- batches


def test_get_batch_shapes_shift_and_determinism():
    tokens = np.arange(5000, dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    x, y = data.get_batch(tokens, 8, 16, g)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], y[:, :-1])
    assert int(y.max()) < 5000

    x2, _ = data.get_batch(tokens, 8, 16, torch.Generator().manual_seed(0))
    x3, _ = data.get_batch(tokens, 8, 16, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2) and not torch.equal(x, x3)

    state = g.get_state()  # resuming from a saved generator state replays the same batches
    nxt, _ = data.get_batch(tokens, 8, 16, g)
    resumed = torch.Generator()
    resumed.set_state(state)
    assert torch.equal(data.get_batch(tokens, 8, 16, resumed)[0], nxt)


def test_get_batch_reaches_the_last_token():
    tokens = np.arange(11, dtype=np.uint16)  # exactly one window of T=10 fits
    x, y = data.get_batch(tokens, 3, 10, torch.Generator().manual_seed(0))
    assert torch.equal(x[0], torch.arange(10)) and torch.equal(y[0], torch.arange(1, 11))


@pytest.mark.parametrize("n", [103, 101, 2, 7])
def test_eval_windows_cover_every_target_once(n):
    tokens = np.arange(n, dtype=np.uint16)
    T, B = 10, 4
    batches = list(data.eval_windows(tokens, T, B))
    targets = torch.cat([y.reshape(-1) for _, y in batches])
    assert torch.equal(targets, torch.arange(1, n))  # each token but the first, once, in order
    for x, y in batches:
        assert x.shape == y.shape and x.dtype == torch.int64 and torch.equal(y, x + 1)
        assert x.shape[0] <= B and x.shape[1] <= T
    assert all(x.shape[1] == T for x, _ in batches[:-1])


# ------------------------------------------------------------------------------------------ errors


def test_missing_path(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_corpus(tmp_path / "nothing.txt")
    assert "nothing.txt" in _one_line(e) and "does not exist" in str(e.value)


@pytest.mark.parametrize("content", ["", "  \n\n\t ", f"\n{EOT}\n{EOT}\n"])
def test_empty_file(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_text(content)
    with pytest.raises(DataError) as e:
        data.load_corpus(f)
    assert "empty.txt" in _one_line(e) and "is empty" in str(e.value)


def test_non_utf8_file(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    with pytest.raises(DataError) as e:
        data.load_corpus(f)
    assert "latin1.txt" in _one_line(e) and "UTF-8" in str(e.value)


def test_folder_without_train_file(tmp_path):
    (tmp_path / "valid.txt").write_text("some text\n")
    with pytest.raises(DataError) as e:
        data.load_corpus(tmp_path)
    assert str(tmp_path) in _one_line(e) and "no train file" in str(e.value)


def test_folder_with_two_train_files(tmp_path):
    (tmp_path / "a-train.txt").write_text("x\n")
    (tmp_path / "b-train.txt").write_text("y\n")
    with pytest.raises(DataError) as e:
        data.load_corpus(tmp_path)
    assert "a-train.txt" in _one_line(e) and "b-train.txt" in str(e.value)


def test_file_too_small_to_split(tmp_path):
    one = tmp_path / "one_story.txt"
    one.write_text(f"Just one story.\n{EOT}\n")
    with pytest.raises(DataError) as e:
        data.load_corpus(one)
    assert "one_story.txt" in _one_line(e) and "at least 2" in str(e.value)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("x")
    with pytest.raises(DataError) as e:
        data.load_corpus(tiny)
    assert "tiny.txt" in _one_line(e) and "too small" in str(e.value)


def test_data_shorter_than_one_context(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("To be, or not to be, that is the question.\n" * 40)
    td = data.prepare(data.load_corpus(f), data.MIN_VOCAB)  # a corpus this small has no more
    n = len(td.valid)
    td.check_context(n - 1)  # exactly fits
    with pytest.raises(DataError) as e:
        td.check_context(n)
    msg = _one_line(e)
    assert f"has {n} tokens" in msg and f"T={n}" in msg and "--T" in msg and "short.txt" in msg
    with pytest.raises(DataError):
        data.get_batch(td.valid, 2, n, torch.Generator().manual_seed(0))


def test_vocab_too_small(tmp_path):
    with pytest.raises(DataError) as e:
        data.train_tokenizer("some text", 100)
    assert "100" in _one_line(e) and "--vocab" in str(e.value)


def test_tinystories_hf_needs_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails; nothing is downloaded
    with pytest.raises(DataError) as e:
        data.load_tinystories_hf()
    assert "datasets" in _one_line(e)
