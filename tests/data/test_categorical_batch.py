"""Categorical ids in padded batches: ``[B, T, C]`` int64, the kept (latest) events' ids in
order, padding 0."""

import numpy as np
import pandas as pd
import torch

from fintwin.data.features import OOV_ID, FeaturiserSpec, Vocab

SPEC = FeaturiserSpec(
    vocab=Vocab(("card", "salary")),
    max_len=3,
    horizon_days=30.0,
    categorical_features=("channel", "country"),
    categorical_vocabs=(Vocab(("atm", "online")), Vocab(("de", "fr"))),
)


def test_batch_pads_categorical_ids_after_each_rows_length():
    events = pd.DataFrame({
        "customer_id": ["a"] * 4 + ["b"],
        "timestamp": pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04",
                                     "2024-01-05"]),
        "event_type": ["card", "salary", "card", "card", "salary"],
        "amount": [1.0, 2.0, 3.0, 4.0, 5.0],
        "channel": ["atm", "online", "atm", "branch", "online"],
        "country": ["de", "de", "fr", "fr", "nl"],
    })
    batch = SPEC.sequences(events, "2024-01-31").batch(np.array([0, 1]), with_targets=False)
    categorical = batch["categorical"]
    assert categorical.dtype == torch.int64 and categorical.shape == (2, 3, 2)
    # a keeps its last three events (max_len 3); branch and nl are unknown to the vocabularies
    assert categorical[0].tolist() == [[3, 2], [2, 3], [OOV_ID, 3]]
    assert categorical[1].tolist() == [[3, OOV_ID], [0, 0], [0, 0]]
    assert batch["length"].tolist() == [3, 1]
