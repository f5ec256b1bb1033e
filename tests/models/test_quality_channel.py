"""The oracle comparison on the synthetic bank with its channel: the oracle reads the channel
whether or not the model does."""

from __future__ import annotations

import pytest
import torch

from fintwin.data.datamodule import EventDataModule
from fintwin.data.schema import EventSchema
from fintwin.data.simulator import SimulatorConfig
from fintwin.models.module import TwinModule
from fintwin.models.quality import oracle_comparison

WORLD = SimulatorConfig(n_customers=150, seed=5, categorical_channel=True)


def _comparison(categorical_features: list[str]) -> dict[str, float]:
    datamodule = EventDataModule(source="synthetic", cutoff="2023-09-30", horizon_days=30.0,
                                 max_len=32, schema=EventSchema(categorical_features=categorical_features),
                                 simulator=WORLD)
    datamodule.setup()
    torch.manual_seed(0)
    model = TwinModule({"name": "lstm", "hidden_size": 8}, vocab_size=datamodule.spec.vocab.size,
                       scaling=datamodule.model_scaling, horizon_days=30.0,
                       categorical_sizes=list(datamodule.spec.categorical_sizes))
    return oracle_comparison(model.eval(), datamodule)


def test_the_oracle_scores_the_channel_world_with_or_without_the_field_declared():
    declared, undeclared = _comparison(["channel"]), _comparison([])
    assert declared["test/oracle_nll"] == pytest.approx(undeclared["test/oracle_nll"], rel=1e-12)
    assert declared["test/marginal_nll"] == pytest.approx(undeclared["test/marginal_nll"], rel=1e-12)
    assert declared["test/oracle_nll"] < declared["test/marginal_nll"]
