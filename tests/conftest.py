"Shared pytest settings: reproducible hypothesis runs and a fixed torch seed for every test."
import os
import pytest
import torch
from hypothesis import settings

from tinyllama.batching import random_chat_model
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


# Prompts and a conversation that the batching and serving tests both send (tests/test_batching.py, test_serve.py).
PROMPTS = ["ROMEO:\n", "", "First Citizen:\nBefore we proceed any further, hear me speak.", "O"]
CONVERSATION = [("user", "Reply as JULIET to:\nROMEO:\nLady, by yonder blessed moon I swear"),
                ("assistant", "JULIET:\nO, swear not by the moon."), ("user", "Who answers?")]


@pytest.fixture(scope="module")
def chat_model():
    "A small random chat model and its tokenizer (appendix H's `random_chat_model`)."
    return random_chat_model(seed=0)
