"""Fed-SB on a Hugging Face ``transformers`` model (skipped when transformers is absent)."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO
from fedlab.callbacks import Evaluator
from fedlab.config import RunConfig
from fedlab.lora import R_KEY
from fedlab.run import build_engine, build_runtime, build_workload
from fedlab.types import Round

pytest.importorskip("transformers")

sys.path.insert(0, str(REPO / "docs" / "examples" / "hf_text"))

TARGET = r".*\.(query|value)"


@pytest.mark.slow
def test_fed_sb_adapts_query_and_value_of_a_tiny_bert_and_fine_tunes_it() -> None:
    config = RunConfig(
        strategy="fed-sb",
        strategy_options={"rank": 4, "target": TARGET, "head": ".*classifier"},
        workload="custom",
        data="textdata:load_client",
        model="textdata:make_model",
        clients=4,
        fraction=1.0,
        rounds=1,
        local_steps=20,
        lr=0.5,
    )
    workload = build_workload(config)
    engine = build_engine(config, workload=workload)
    layers = list(engine.state["r"])
    assert len(layers) == 4 and all(n.endswith(("query.weight", "value.weight")) for n in layers)
    rnd = Round(version=0, time=0.0, num_clients=4, slots=4)
    task = engine.strategy.configure(engine.state, engine.params, rnd)[0]
    update, _ = build_runtime(config, workload).run(0, task, None)
    heads = {"model.classifier.weight", "model.classifier.bias"}
    assert set(update.payload) == {R_KEY + n for n in layers} | heads
    assert all(update.payload[R_KEY + n].shape == (4, 4) for n in layers)
    evaluator = Evaluator(workload)
    start = evaluator.evaluate(engine.params)["accuracy"]
    engine.run(1)
    # Measured 0.60 (pretrained on the source task) -> 0.86 after one version.
    assert evaluator.evaluate(engine.params)["accuracy"] > start + 0.15
    assert not torch.equal(engine.state["r"][layers[0]], torch.zeros(4, 4))
