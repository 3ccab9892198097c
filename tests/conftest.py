"""Shared fixtures: the real model is loaded and captured once per test session."""

import pytest
import torch

from qcompile.models import TINY_ARCHS, tiny
from qcompile.program import Program


@pytest.fixture(scope="session")
def smollm2():
    from qcompile.models import load

    return load("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_program(smollm2):
    model, _ = smollm2
    return Program.capture(model)


@pytest.fixture(scope="session")
def smollm2_ids(smollm2):
    from qcompile.eval.data import TEST, token_ids

    _, tok = smollm2
    return token_ids(tok, TEST)[:256].view(1, 256)


@pytest.fixture(scope="session")
def smollm2_logits(smollm2, smollm2_ids):
    """The original model's logits on ``smollm2_ids``: what every exact rewrite must reproduce."""
    model, _ = smollm2
    with torch.no_grad():
        return model(input_ids=smollm2_ids).logits


@pytest.fixture(scope="session")
def tiny_programs():
    """{arch: (model, Program)} for every tiny architecture, captured once."""
    return {arch: (m := tiny(arch), Program.capture(m)) for arch in TINY_ARCHS}


@pytest.fixture
def tiny_ids():
    return torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(1))


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| / max|b|: the exactness measure (≤ 1e-4 in float32)."""
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is many times faster than several fighting over busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
