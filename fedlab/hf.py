"""Hugging Face ``transformers`` models as fedlab models (optional extra ``fedlab[hf]``).

fedlab's models map a float feature tensor to logits, and its data is float (``ClientData``).
A ``transformers`` sequence classifier takes integer ``input_ids`` (and an attention mask) and
returns a ``ModelOutput``. :class:`SequenceClassifier` bridges the two, so the model trains with
the one local training loop, evaluates with the ordinary evaluator, and its ``nn.Linear``
layers (``...attention.self.query`` and ``...value`` in BERT) can be adapted by Fed-SB or FedIT
by name pattern. Nothing is downloaded: :func:`tiny_bert` builds a model from a config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("this needs Hugging Face transformers: pip install 'fedlab[hf]'") from e
    return transformers


class SequenceClassifier(nn.Module):
    """``x -> logits`` for a ``transformers`` sequence-classification model.

    ``x`` holds token ids as floats (``(batch, length)``); they are rounded to ``int64``.
    Positions equal to ``pad_token_id`` are masked out of attention.

    Args:
        model: e.g. a ``BertForSequenceClassification``; its state-dict names gain the prefix
            ``model.``.
        pad_token_id: the padding token.
    """

    def __init__(self, model: nn.Module, pad_token_id: int = 0) -> None:
        super().__init__()
        self.model = model
        self.pad_token_id = pad_token_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.round().long()
        out = self.model(input_ids=ids, attention_mask=(ids != self.pad_token_id).long())
        logits: torch.Tensor = out.logits
        return logits


def tiny_bert(
    *,
    num_labels: int,
    vocab_size: int = 64,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 64,
) -> SequenceClassifier:
    """A small ``BertForSequenceClassification`` built from a config (no download), wrapped.

    Dropout is off: ``transformers`` draws dropout masks from torch's global generator, which
    fedlab's seeded streams do not control, so runs would not be reproducible with it.
    """
    tf = _transformers()
    config = tf.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    return SequenceClassifier(tf.BertForSequenceClassification(config), pad_token_id=0)
