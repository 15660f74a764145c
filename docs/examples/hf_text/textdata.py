"""A token-sequence federation for a tiny Hugging Face BERT (``pip install 'fedlab[hf]'``).

``--workload custom --data textdata:load_client --model textdata:make_model``. Each example is
16 tokens from a vocabulary of 64 (0 is padding, the tail is padded); its label (one of 4) is
its topic, and 80% of its tokens come from the topic's range of 12 token ids. The model is
pretrained centrally on a *source* task whose topic ranges start at token 4 (4-15, 16-27, ...);
the clients and the test set hold the *target* task, whose ranges start at token 10, so half of
each topic's tokens are new to it: federated fine-tuning has to adapt it. Clients differ in size
and in which topics they see most. Everything is computed from the seed; nothing is downloaded.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from fedlab.data import ClientData, pretrain
from fedlab.hf import SequenceClassifier, tiny_bert

LENGTH = 16
TOPICS = 4
VOCAB = 64
SOURCE_START, TARGET_START = 4, 10
PRETRAIN = {"lr": 0.05, "momentum": 0.9, "local_steps": 150, "batch_size": 32}


def _examples(
    rng: np.random.Generator, n: int, skew: np.ndarray, start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    y = rng.choice(TOPICS, size=n, p=skew)
    topic = start + 12 * y[:, None] + rng.integers(0, 12, size=(n, LENGTH))
    noise = rng.integers(1, VOCAB, size=(n, LENGTH))
    tokens = np.where(rng.random((n, LENGTH)) < 0.8, topic, noise)
    lengths = rng.integers(LENGTH // 2, LENGTH + 1, size=n)
    tokens[np.arange(LENGTH)[None, :] >= lengths[:, None]] = 0
    return torch.from_numpy(tokens.astype(np.float32)), torch.from_numpy(y.astype(np.int64))


@functools.cache
def _pretrained() -> dict[str, torch.Tensor]:
    x, y = _examples(np.random.default_rng([0, 9]), 600, np.full(TOPICS, 1 / TOPICS), SOURCE_START)
    with torch.random.fork_rng(devices=[]):  # seed the initial weights, leave the caller's RNG
        torch.manual_seed(0)
        model = tiny_bert(num_labels=TOPICS, vocab_size=VOCAB)
    return pretrain(model, ClientData(x, y), 0, PRETRAIN)


def make_model() -> SequenceClassifier:
    """A 2-layer BERT (hidden 32) built from a config and pretrained on the source task."""
    model = tiny_bert(num_labels=TOPICS, vocab_size=VOCAB)
    model.load_state_dict(_pretrained())
    return model


def load_client(client_id: int, num_clients: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng([seed, 7, client_id])
    n = int(rng.integers(40, 120))
    return _examples(rng, n, rng.dirichlet(np.ones(TOPICS)), TARGET_START)


def load_test(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _examples(
        np.random.default_rng([seed, 8]), 400, np.full(TOPICS, 1 / TOPICS), TARGET_START
    )
