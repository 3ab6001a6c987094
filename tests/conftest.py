"Shared pytest settings: reproducible hypothesis runs and a fixed torch seed for every test."
import os
import pytest
import torch
from hypothesis import settings

from tinyllama.train import load_trained_model

# CI is a shared 2-core machine: no per-example deadline, and the same examples on every run.
settings.register_profile("ci", deadline=None, derandomize=True, max_examples=200)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# The tests run tiny models, for which a second thread costs more in hand-offs than it computes;
# one thread each also lets pytest-xdist run two workers on a 2-core machine without contention.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def trained(checkpoint):
    "The model and tokenizer of the test module's own `checkpoint` fixture."
    model, tokenizer, _ = load_trained_model(checkpoint)
    return model, tokenizer
