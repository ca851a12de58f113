import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from ept import EPTConfig, EquilibriumLM
from ept.data import load_corpus, prepare

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(stem: str) -> ModuleType:
    """benchmarks/STEM.py as a module (registered in sys.modules: dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(f"bench_{stem}", BENCHMARKS / f"{stem}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def small_model(scale: float = 1.0, seed: int = 0, c: float = 1.0, **overrides) -> EquilibriumLM:
    """A float64 block small enough for dense Jacobians; ``scale`` multiplies the weight matrices."""
    torch.manual_seed(seed)
    cfg = EPTConfig(**{"vocab_size": 50, "C": 16, "H": 2, "T": 8, "c": c, **overrides})
    model = EquilibriumLM(cfg).double()
    with torch.no_grad():
        for p in model.weight_matrices().values():
            p.mul_(scale)
    return model


def batch(model: EquilibriumLM, B: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    V, T = model.cfg.vocab_size, model.cfg.T
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and far faster on a shared, busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def model() -> EquilibriumLM:
    return small_model()


def write_corpus(folder: Path) -> Path:
    """40k characters of Shakespeare as a user data file (its tokenizer trains in about a second)."""
    path = folder / "plays.txt"
    path.write_text(load_corpus(None).valid[:40_000])
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tokens(corpus_file):
    return prepare(load_corpus(corpus_file), 300)
