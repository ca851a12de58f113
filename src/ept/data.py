"""Data layer: corpora, a locally trained byte-level BPE tokenizer, cached token files, and batches.

Nothing here touches the network (except the opt-in ``load_tinystories_hf``). The default corpus is
the Shakespeare text embedded in the package; a user corpus is a text file or a folder of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import lzma
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor

EOT = "<|endoftext|>"
VALID_FRACTION = 0.05
MIN_VOCAB = 257  # 256 byte symbols + the end-of-text token
_CACHE_VERSION = b"ept-data-v1"  # bump when tokenizer settings or the file layout change
_CHUNK_CHARS = 1 << 16
_BATCH_CHARS = 1 << 22
_VALID_NAMES = ("valid.txt", "val.txt", "validation.txt")
# Cutting just before a lone space/newline that sits between two non-space characters falls on a
# boundary of the ByteLevel pre-tokenizer's regex, so encoding the chunks gives exactly the ids of
# encoding the whole text (tested), while bounding memory and letting encode_batch use every core.
_SAFE_CUT = re.compile(r"(?<=\S)[ \n](?=\S)")


class DataError(ValueError):
    """Bad data input; the message is one line naming the problem and the fix."""


@dataclass
class Corpus:
    train: str
    valid: str
    source: str
    cache_dir: Path


@dataclass
class TokenData:
    tokenizer: Tokenizer
    train: np.ndarray
    valid: np.ndarray
    vocab_size: int
    eot_id: int
    key: str
    source: str = ""

    def encode(self, text: str) -> list[int]:
        return [i for arr in _encode_batches(self.tokenizer, text, np.int64) for i in arr.tolist()]

    def decode(self, ids: Iterable[int]) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # tensors and arrays, on any device
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def check_context(self, T: int) -> None:
        where = f" of {self.source}" if self.source else ""
        for split, arr in (("train", self.train), ("valid", self.valid)):
            if len(arr) < T + 1:
                raise DataError(f"the {split} split{where} has {len(arr)} tokens but context T={T} needs "
                                f"at least {T + 1}: use a smaller --T (at most {max(len(arr) - 1, 0)}) "
                                "or more data")


def load_corpus(path: str | Path | None = None) -> Corpus:
    """None: the embedded Shakespeare. A file: the last ~5% is held out as valid. A folder: train/valid."""
    if path is None:
        return Corpus(_embedded("train"), _embedded("valid"),
                      "embedded Shakespeare (train: 37 works; valid: Julius Caesar, Twelfth Night)",
                      _home_cache())
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path '{p}' does not exist: point --data at a text file or a folder with "
                        "train.txt, or leave --data out to use the embedded Shakespeare")
    if not p.is_dir():
        train, valid, how = _split_text(_read_text(p), p)
        return Corpus(train, valid, f"file '{p}' ({how})", _cache_dir_for(p.parent))
    train_file, valid_file = _find_split_files(p)
    text = _read_text(train_file)
    if valid_file is None:
        train, valid, how = _split_text(text, train_file)
        return Corpus(train, valid, f"folder '{p}' ({train_file.name}, {how})", _cache_dir_for(p))
    train, valid = (_join(_docs(t)) if EOT in t else t for t in (text, _read_text(valid_file)))
    return Corpus(train, valid, f"folder '{p}' ({train_file.name} / {valid_file.name})", _cache_dir_for(p))


def _embedded(split: str) -> str:
    try:
        raw = (resources.files("ept.corpus") / f"shakespeare_{split}.txt.xz").read_bytes()
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise DataError(f"embedded corpus file missing ({e}): reinstall ept, or pass --data") from None
    return lzma.decompress(raw).decode("utf-8")


def _read_text(p: Path) -> str:
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file '{p}' is not UTF-8 text ({e.reason} at byte {e.start}): "
                        "convert it to UTF-8, e.g. with iconv") from None
    except OSError as e:
        raise DataError(f"cannot read data file '{p}' ({e.strerror}): check that it is a readable file") \
            from None
    if not text.replace(EOT, "").strip():
        raise DataError(f"data file '{p}' is empty: point --data at a text file with some text in it")
    return text


def _find_split_files(folder: Path) -> tuple[Path, Path | None]:
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix == ".txt")

    def pick(exact: Sequence[str], word: str, role: str) -> Path | None:
        for name in exact:
            if (folder / name).is_file():
                return folder / name
        found = [f for f in files if word in f.name.lower()]  # e.g. TinyStories-train.txt
        if len(found) > 1:
            names = ", ".join(f.name for f in found)
            raise DataError(f"folder '{folder}' has several {role} files ({names}): keep one, or point "
                            "--data at a single file")
        return found[0] if found else None

    train = pick(("train.txt",), "train", "train")
    if train is None:
        raise DataError(f"folder '{folder}' has no train file: add train.txt (and optionally valid.txt), "
                        "or point --data at a single text file")
    return train, pick(_VALID_NAMES, "valid", "validation")


def _docs(text: str) -> list[str]:
    return [d for d in (s.strip() for s in text.split(EOT)) if d]


def _join(docs: Sequence[str]) -> str:
    # Each document ends with the marker, so the model learns where a story stops and the tokenizer
    # never merges across a boundary.
    return "".join(d + EOT for d in docs)


def _split_text(text: str, p: Path) -> tuple[str, str, str]:
    if EOT in text:  # raw TinyStories format: hold out whole stories
        docs = _docs(text)
        if len(docs) < 2:
            raise DataError(f"data file '{p}' holds {len(docs)} document: need at least 2 to hold one out "
                            "for validation; add documents, or give a folder with train.txt and valid.txt")
        k = max(1, round(len(docs) * VALID_FRACTION))
        return _join(docs[:-k]), _join(docs[-k:]), f"{len(docs) - k} train / {k} valid documents"
    target = len(text) - max(1, int(len(text) * VALID_FRACTION))
    # Cut at the line boundary nearest the 95% mark that leaves text on both sides.
    near = (text.rfind("\n", 0, target), text.find("\n", target))
    cuts = [c + 1 for c in near if c >= 0 and text[: c + 1].strip() and text[c + 1 :].strip()]
    cut = min(cuts, key=lambda c: abs(c - target)) if cuts else target
    train, valid = text[:cut], text[cut:]
    if not train.strip() or not valid.strip():
        raise DataError(f"data file '{p}' is too small to split into train and valid ({len(text)} "
                        "characters): use a larger file, or a folder with train.txt and valid.txt")
    return train, valid, f"last {100 * len(valid) / len(text):.1f}% of the text held out as valid"


def _home_cache() -> Path:
    env = os.environ.get("EPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ept"


def _cache_dir_for(base: Path) -> Path:
    if os.environ.get("EPT_CACHE"):
        return _home_cache()
    d = base / ".ept_cache"
    try:  # probe with a real write: permission bits lie on read-only mounts and for root
        d.mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=d):
            pass
        return d
    except OSError:
        return _home_cache()


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    # Temp file in the same folder + os.replace: a reader sees the old file or the complete new one,
    # never a torn one, even if this process is killed mid-write.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def corpus_key(train: str, valid: str, vocab_size: int) -> str:
    """sha256 over both splits and the vocab size: the name of a corpus's cached tokenizer and tokens."""
    h = hashlib.sha256(_CACHE_VERSION)
    for text in (train, valid):
        part = hashlib.sha256()
        for i in range(0, len(text), 1 << 24):  # bounded extra memory for multi-GB corpora
            part.update(text[i : i + (1 << 24)].encode("utf-8"))
        h.update(part.digest())
    h.update(str(vocab_size).encode())
    return h.hexdigest()


def _chunks(text: str, size: int) -> Iterator[str]:
    start = 0
    while len(text) - start > size and (m := _SAFE_CUT.search(text, start + size)):
        yield text[start : m.start()]
        start = m.start()
    if start < len(text):
        yield text[start:]


def train_tokenizer(texts: str | Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer locally; deterministic for the same input."""
    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab size {vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB} "
                        f"(256 bytes + {EOT}); use --vocab {MIN_VOCAB} or more")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, even unseen ones
        show_progress=False,
    )
    # The trainer does not split out special tokens (it would learn merges like "<|"), so we do.
    pieces = (c for t in ([texts] if isinstance(texts, str) else texts)
              for doc in t.split(EOT) for c in _chunks(doc, _CHUNK_CHARS))
    tok.train_from_iterator(pieces, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    blob = tok.to_str().encode("utf-8")
    _atomic_write(Path(path), lambda f: f.write(blob))


def load_tokenizer(path: str | Path) -> Tokenizer:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"tokenizer file '{p}' not found: point at the tokenizer.json in the run folder")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"tokenizer file '{p}' is not a valid tokenizer ({e}): delete it to retrain") \
            from None


def _encode_batches(tok: Tokenizer, text: str, dtype: type) -> Iterator[np.ndarray]:
    # Bounded batches stream a multi-GB corpus to disk instead of holding a Python list of ints.
    chunks = _chunks(text, _CHUNK_CHARS)
    while batch := list(itertools.islice(chunks, max(1, _BATCH_CHARS // _CHUNK_CHARS))):
        encs = tok.encode_batch(batch, add_special_tokens=False)
        yield np.fromiter(itertools.chain.from_iterable(e.ids for e in encs), dtype=dtype)


def prepare(corpus: Corpus, vocab_size: int, log: Callable[[str], None] | None = None) -> TokenData:
    """Tokenize a corpus, reusing the tokenizer and token files cached under its content hash."""
    key = corpus_key(corpus.train, corpus.valid, vocab_size)
    d, stem = corpus.cache_dir, f"{key[:16]}-v{vocab_size}"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create cache folder '{d}' ({e.strerror}): set EPT_CACHE to a writable "
                        "folder") from None
    tok_path = d / f"tokenizer-{stem}.json"
    retrained = not tok_path.is_file()
    if retrained:
        if log:
            log(f"training a {vocab_size}-token BPE tokenizer on {len(corpus.train):,} characters")
        tok = train_tokenizer([corpus.train], vocab_size)
        save_tokenizer(tok, tok_path)
    else:
        tok = load_tokenizer(tok_path)
    n_vocab = tok.get_vocab_size()
    if n_vocab < vocab_size:  # BPE ran out of pairs seen twice: the model would silently get fewer tokens
        raise DataError(f"the corpus is too small for --vocab_size {vocab_size}: byte-level BPE finds only "
                        f"{n_vocab} tokens in its {len(corpus.train):,} training characters; use "
                        f"--vocab_size {n_vocab} or less, or more text")
    dtype = np.uint16 if n_vocab <= 1 << 16 else np.uint32
    arrays = {}
    for split, text in (("train", corpus.train), ("valid", corpus.valid)):
        path = d / f"{split}-{stem}.bin"
        # Token files are only valid for the tokenizer that made them: redo them after a retrain.
        if retrained or not path.is_file() or path.stat().st_size % np.dtype(dtype).itemsize:
            if log:
                log(f"tokenizing the {split} split ({len(text):,} characters)")

            def write(f: BinaryIO, text: str = text) -> None:
                for arr in _encode_batches(tok, text, dtype):
                    arr.tofile(f)

            _atomic_write(path, write)
        # numpy cannot map an empty file
        arrays[split] = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)
    return TokenData(tok, arrays["train"], arrays["valid"], n_vocab, tok.token_to_id(EOT), key, corpus.source)


def get_batch(
    tokens: np.ndarray, B: int, T: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """B random windows: int64 inputs (B, T) and next-token targets (B, T)."""
    n = len(tokens)
    if n < T + 1:
        raise DataError(f"split has {n} tokens but context T={T} needs at least {T + 1}: use a smaller --T "
                        "or more data")
    # Offsets come only from the generator, so saving its state makes a run exactly resumable.
    starts = torch.randint(0, n - T, (B,), generator=generator, device=generator.device).cpu()
    win = torch.from_numpy(np.asarray(tokens[starts.numpy()[:, None] + np.arange(T + 1)], dtype=np.int64))
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()


IGNORE = -100  # the target of a position the loss skips (F.cross_entropy's ignore_index)


def mask_count(width: int, rate: float) -> int:
    """Positions masked in a sequence of ``width`` tokens: the nearest to ``rate``·width, at least one."""
    return max(1, min(width, round(rate * width)))


def mask_from_keys(keys: Tensor, rate: float) -> Tensor:
    """The boolean mask of each row's :func:`mask_count` positions with the smallest ``keys``.

    An exact count per row (not one coin per position) keeps every sequence's share of the loss
    the same and never leaves a sequence with nothing to predict.
    """
    k = mask_count(keys.shape[-1], rate)
    picked = keys.argsort(dim=-1)[..., :k]
    return torch.zeros(keys.shape, dtype=torch.bool, device=keys.device).scatter_(-1, picked, True)


def apply_mask(idx: Tensor, mask: Tensor, mask_id: int) -> tuple[Tensor, Tensor]:
    """(inputs, targets): masked positions read ``mask_id`` and are the targets (the token itself);
    every other target is :data:`IGNORE`."""
    return idx.masked_fill(mask, mask_id), idx.masked_fill(~mask, IGNORE)


def mask_tokens(idx: Tensor, rate: float, mask_id: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Mask a ``rate`` fraction of each row of ``idx`` (at least one position): (inputs, targets).

    The positions come only from ``generator`` (on the CPU), so saving its state makes an MLM run
    exactly resumable.
    """
    keys = torch.rand(idx.shape, generator=generator)
    return apply_mask(idx, mask_from_keys(keys, rate), mask_id)


def get_windows(tokens: np.ndarray, B: int, T: int, generator: torch.Generator) -> Tensor:
    """B random windows of T tokens, int64 (B, T): an MLM batch predicts the window itself."""
    n = len(tokens)
    if n < T:
        raise DataError(f"split has {n} tokens but context T={T} needs at least {T}: use a smaller --T "
                        "or more data")
    starts = torch.randint(0, n - T + 1, (B,), generator=generator, device=generator.device).cpu()
    return torch.from_numpy(np.asarray(tokens[starts.numpy()[:, None] + np.arange(T)], dtype=np.int64))


def get_mlm_batch(tokens: np.ndarray, B: int, T: int, windows: torch.Generator, masks: torch.Generator,
                  rate: float, mask_id: int) -> tuple[Tensor, Tensor]:
    """B random windows, masked: (inputs with ``mask_id`` at the masked positions, targets)."""
    return mask_tokens(get_windows(tokens, B, T, windows), rate, mask_id, masks)


def mlm_windows(tokens: np.ndarray, T: int, B: int) -> Iterator[tuple[int, Tensor]]:
    """(offset of the first token, windows) over the whole split, non-overlapping: every token is in
    exactly one window. Full windows come in batches of up to B rows, a final partial window last
    as a (1, r) batch with r < T."""
    n = len(tokens)
    if n < 1:
        raise DataError("split has no tokens: evaluation needs at least 1; use more data")
    n_full = n // T
    for i in range(0, n_full, B):
        rows = min(B, n_full - i)
        chunk = np.asarray(tokens[i * T : (i + rows) * T], dtype=np.int64)
        yield i * T, torch.from_numpy(chunk).view(rows, T)
    if n % T:
        yield n_full * T, torch.from_numpy(np.asarray(tokens[n_full * T :], dtype=np.int64)).view(1, -1)


EVAL_MASK_SEED = 1234  # every evaluation of every MLM run masks the same positions of a text


def mlm_eval_windows(tokens: np.ndarray, T: int, B: int, rate: float, mask_id: int,
                     seed: int = EVAL_MASK_SEED) -> Iterator[tuple[Tensor, Tensor]]:
    """:func:`mlm_windows`, masked: (inputs, targets) over the whole split, the same masks every time.

    Each token draws its key from ``seed`` by its position in the split, so the masks depend on
    neither B nor how many batches are read: a periodic evaluation's first batches are masked as
    the final one's are.
    """
    keys = torch.from_numpy(np.random.default_rng(seed).random(len(tokens)))
    for start, win in mlm_windows(tokens, T, B):
        mask = mask_from_keys(keys[start : start + win.numel()].view(win.shape), rate)
        yield apply_mask(win, mask, mask_id)


def _byte_level_alphabet() -> dict[str, int]:
    """The ByteLevel pre-tokenizer's printable stand-in for each byte (GPT-2's bytes_to_unicode)."""
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_chars(tokenizer: Tokenizer) -> np.ndarray:
    """Characters each token id contributes to decoded text, int64 (vocab,).

    A token is counted by the UTF-8 characters that *start* in its bytes, so a character split
    across tokens counts once and the counts of a text's tokens sum to its length exactly (the
    per-token decoded length would count each fragment as a replacement character). Special
    tokens count their decoded length.
    """
    alphabet = _byte_level_alphabet()
    n = tokenizer.get_vocab_size()
    out = np.zeros(n, dtype=np.int64)
    for i in range(n):
        piece = tokenizer.id_to_token(i) or ""
        if piece and all(c in alphabet for c in piece):
            out[i] = sum(1 for c in piece if alphabet[c] & 0xC0 != 0x80)  # not a continuation byte
        else:
            out[i] = len(tokenizer.decode([i], skip_special_tokens=False))
    return out


def builtin_tokens(vocab_size: int) -> TokenData:
    """The embedded corpus tokenized at ``vocab_size`` (cached): what benchmarks and tests train on."""
    return prepare(load_corpus(None), vocab_size)


def fixed_batch(tokens: np.ndarray, B: int, T: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """The same B windows on every call with the same seed (benchmarks compare routes on them)."""
    return get_batch(tokens, B, T, torch.Generator().manual_seed(seed))


def eval_windows(tokens: np.ndarray, T: int, B: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows over the whole split; every token but the first is a target once.

    Full windows come in batches of up to B rows; a final partial window comes last as a (1, r) batch
    with r < T, so summing CE over all targets and dividing by len(tokens) - 1 gives the exact mean.
    """
    n = len(tokens)
    if n < 2:
        raise DataError(f"split has {n} tokens: evaluation needs at least 2; use more data")
    n_full = (n - 1) // T
    for i in range(0, n_full, B):
        rows = min(B, n_full - i)
        chunk = torch.from_numpy(np.asarray(tokens[i * T : (i + rows) * T + 1], dtype=np.int64))
        yield chunk[:-1].view(rows, T), chunk[1:].view(rows, T)
    if (n - 1) % T:
        chunk = torch.from_numpy(np.asarray(tokens[n_full * T :], dtype=np.int64))
        yield chunk[:-1].view(1, -1), chunk[1:].view(1, -1)


def load_tinystories_hf(max_stories: int | None = None, cache_dir: str | Path | None = None) -> Corpus:
    """TinyStories (train and validation splits) from the Hugging Face Hub. Needs internet access and
    ``pip install datasets``; never used by default or by the tests."""
    try:
        import datasets  # optional dependency, imported only here
    except ImportError:
        raise DataError("load_tinystories_hf needs the 'datasets' package and internet access: pip install "
                        "datasets, or download the TinyStories text files and use --data") from None
    ds = datasets.load_dataset("roneneldan/TinyStories")
    texts = {}
    for split in ("train", "validation"):
        rows = ds[split] if max_stories is None else ds[split].select(range(min(max_stories, len(ds[split]))))
        texts[split] = _join(_docs(EOT.join(rows["text"])))
    cache = Path(cache_dir).expanduser() if cache_dir is not None else _home_cache()
    return Corpus(texts["train"], texts["validation"], "TinyStories (roneneldan/TinyStories, HF Hub)", cache)
