"""FeaturiserSpec: JSON round trip, the one converter of old settings, categorical ids."""

import json

import numpy as np
import pandas as pd
import pytest

from fintwin.data.datamodule import CustomerSplit, EventDataModule
from fintwin.data.features import (
    OOV_ID,
    FeaturiserSpec,
    Scaling,
    Vocab,
    stored_spec,
)
from fintwin.data.schema import EventSchema
from fintwin.errors import FintwinInputError

SCALING = Scaling(3.0, 1.0, 1.5, 0.5, 1.2, 0.8, (100.0,), (30.0,))
SPEC = FeaturiserSpec(
    vocab=Vocab(("card", "salary")),
    max_len=32,
    horizon_days=30.0,
    scaling=SCALING,
    same_day_merge=True,
    numeric_features=("balance",),
    categorical_features=("channel", "country"),
    categorical_vocabs=(Vocab(("atm", "online")), Vocab(("de", "fr", "nl"))),
    allow_negative_amount=True,
    drop_duplicates=True,
    day_first=True,
    decimal=",",
)
# What checkpoints stored before FeaturiserSpec: the data module's flat settings, the
# model's scaling dict (with its training statistics) among them.
LEGACY_CHECKPOINT = {
    "source": "events.csv", "cutoff": "2024-05-31", "observation_end": "2024-06-01T00:00:00",
    "horizon_days": 30.0, "max_len": 32, "same_day_merge": True,
    "numeric_features": ["balance"], "categorical_features": [],
    "allow_negative_amount": True, "drop_duplicates": True, "simulator": None,
    "vocab": {"card": 2, "salary": 3},
    "scaling": SCALING.to_dict() | {"events_per_customer": 4.5, "dormancy_init": 0.2},
}  # fmt: skip


def test_spec_round_trips_through_json_to_an_equal_spec():
    data = json.loads(json.dumps(SPEC.to_dict()))
    assert data["format"] == 1
    assert data["categorical_vocabs"] == {
        "channel": {"atm": 2, "online": 3}, "country": {"de": 2, "fr": 3, "nl": 4},
    }  # fmt: skip
    assert FeaturiserSpec.from_dict(data) == SPEC
    assert stored_spec({"featuriser": data, "cutoff": "2024-05-31"}, "x") == SPEC


def test_spec_gives_the_schema_its_events_are_read_with():
    assert SPEC.schema() == EventSchema(
        numeric_features=["balance"],
        categorical_features=["channel", "country"],
        allow_negative_amount=True,
        drop_duplicates=True,
        day_first=True,
        decimal=",",
    )
    assert SPEC.categorical_sizes == (4, 5) and SPEC.n_numeric == 1


def test_legacy_checkpoint_settings_convert_to_the_spec():
    spec = FeaturiserSpec.from_dict(LEGACY_CHECKPOINT, "old.ckpt")
    assert spec == FeaturiserSpec(
        vocab=Vocab(("card", "salary")),
        max_len=32,
        horizon_days=30.0,
        scaling=SCALING,
        same_day_merge=True,
        numeric_features=("balance",),
        allow_negative_amount=True,
        drop_duplicates=True,
    )


def test_legacy_export_metadata_is_refused_with_how_to_export_again():
    """Exports before FeaturiserSpec dropped the schema options: serving them would refuse
    the events the twin was trained on, so they are refused themselves."""
    metadata = {key: LEGACY_CHECKPOINT[key] for key in
                ("vocab", "numeric_features", "horizon_days", "max_len", "same_day_merge",
                 "observation_end", "scaling")} | {"quantiles": [0.1, 0.5, 0.9]}  # fmt: skip
    with pytest.raises(FintwinInputError) as error:
        stored_spec(metadata, "model 'twin'")
    assert str(error.value) == (
        "model 'twin': featuriser settings written before fintwin's FeaturiserSpec lack "
        "['allow_negative_amount', 'drop_duplicates'], so events cannot be read as in "
        "training; export the model again from its checkpoint (fintwin export --ckpt CKPT "
        "--repo DIR), or train it again"
    )


def test_legacy_settings_without_a_scaling_statistic_are_refused():
    scaling = {k: v for k, v in LEGACY_CHECKPOINT["scaling"].items() if k != "gap_log_mean"}
    with pytest.raises(FintwinInputError) as error:
        FeaturiserSpec.from_dict(LEGACY_CHECKPOINT | {"scaling": scaling}, "old.ckpt")
    assert str(error.value).startswith("old.ckpt: scaling statistics lack ['gap_log_mean']; ")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"format": 2}, "featuriser settings of format 2; this fintwin reads format 1"),
        ({"max_lenn": 3}, "lack [] and have unknown keys ['max_lenn']"),
    ],
)
def test_unreadable_spec_settings_are_refused_naming_the_problem(change, words):
    with pytest.raises(FintwinInputError, match=r"^x\.json: ") as error:
        FeaturiserSpec.from_dict(SPEC.to_dict() | change, "x.json")
    assert words in str(error.value)


def test_categorical_fields_become_ids_in_spec_order_unknown_values_oov():
    events = pd.DataFrame({
        "customer_id": ["a", "a", "b"],
        "timestamp": pd.to_datetime(["2024-01-01", "2024-01-03", "2024-01-02"]),
        "event_type": ["card", "salary", "loan"],
        "amount": [1.0, -2.0, 3.0],
        "balance": [10.0, 20.0, 30.0],
        "channel": ["online", "atm", "branch"],
        "country": ["nl", "de", "nl"],
    })  # fmt: skip
    features = SPEC.event_features(SPEC.read_events(events))
    assert features["categorical"].dtype == np.int64
    assert features["categorical"].tolist() == [[3, 4], [2, 2], [OOV_ID, 4]]
    assert features["event_type"].tolist() == [2, 3, OOV_ID]
    assert features["numeric"][:, 0].tolist() == [10.0, 20.0, 30.0]


def test_datamodule_fits_categorical_vocabularies_on_training_calibration_events(events):
    rng = np.random.default_rng(0)
    events = events.assign(channel=rng.choice(["atm", "online", "branch"], len(events)))
    late = events["timestamp"] >= pd.Timestamp("2024-06-01")
    events.loc[late, "channel"] = "after_cutoff"
    dm = EventDataModule(events=events, cutoff="2024-05-31", horizon_days=30, max_len=16,
                         schema=EventSchema(categorical_features=["channel"]),
                         split=CustomerSplit(val=0.2, test=0.2, seed=3))  # fmt: skip
    dm.setup()
    train_ids = set(dm.sequences.customer_ids[dm.splits["train"]])
    seen = events[~late & events["customer_id"].isin(train_ids)]["channel"]
    assert dm.spec.categorical_vocabs == (Vocab.fit(seen),)
    assert "after_cutoff" not in dm.spec.categorical_vocabs[0].tokens
    assert dm.sequences.features["categorical"].shape == (dm.sequences.n_events, 1)
