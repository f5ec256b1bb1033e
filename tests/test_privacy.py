"""privacy=dp: DP-SGD training through train.py's config, its accounting, checks and export."""

import json
import math

import pytest
import pytorch_lightning as pl
import torch
from opacus.optimizers import DPOptimizer
from torch import nn

from fintwin.errors import FintwinInputError
from fintwin.export.onnx import export_to_repository
from fintwin.models.checkpoint import PRIVACY_KEY, load_twin, read_checkpoint
from fintwin.privacy import DifferentialPrivacy, PrivacyConfig
from fintwin.training import build, run
from tests.test_train import compose_cfg, tiny_overrides

EPSILON = 3.0


def private_overrides(events_csv: str, model: str) -> list[str]:
    """One epoch of DP-SGD on the tiny table (48 training customers, Poisson batches of 16)."""
    return [
        *tiny_overrides(events_csv, model),
        "privacy=dp",
        f"privacy.target_epsilon={EPSILON}",
        "trainer.max_epochs=1",
    ]


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory, events_csv):
    """A private LSTM run's directory and metrics (tested, so metrics.json is complete)."""
    out = tmp_path_factory.mktemp("dp_lstm")
    metrics = run(compose_cfg(out, private_overrides(events_csv, "lstm")))
    return out, metrics


def test_private_lstm_run_reports_its_epsilon(lstm_run):
    out, metrics = lstm_run
    saved = json.loads((out / "metrics.json").read_text())
    epsilon = saved["privacy/epsilon"]
    assert math.isfinite(epsilon) and 0 < epsilon <= EPSILON
    assert epsilon > 0.5 * EPSILON  # the whole planned budget is spent by the planned steps
    assert saved["privacy/steps"] == saved["privacy/planned_steps"] == 3  # 1 / (16 / 48)
    assert saved["privacy/sample_rate"] == pytest.approx(16 / 48)
    assert saved["privacy/delta"] == 1e-5 and saved["privacy/noise_multiplier"] > 0
    assert math.isfinite(saved["test/loss"])


def test_private_transformer_run_reports_its_epsilon(tmp_path, events_csv):
    run(compose_cfg(tmp_path, private_overrides(events_csv, "transformer") + ["test=false"]))
    epsilon = json.loads((tmp_path / "metrics.json").read_text())["privacy/epsilon"]
    assert math.isfinite(epsilon) and 0 < epsilon <= EPSILON


def test_checkpoints_of_a_private_run_load_as_plain_twins(lstm_run):
    """The DPLSTM trained in place of the LSTM leaves nn.LSTM's keys; each checkpoint holds
    the budget spent up to its step."""
    out, metrics = lstm_run
    best = out / metrics["best_checkpoint"]
    ckpt = read_checkpoint(best)
    assert ckpt[PRIVACY_KEY]["unit"] == "customer"
    assert 0 < ckpt[PRIVACY_KEY]["epsilon"] <= metrics["privacy/epsilon"]
    twin = load_twin(best)
    assert type(twin.model.encoder.lstm) is nn.LSTM
    assert twin.privacy == ckpt[PRIVACY_KEY]


@pytest.mark.slow
def test_export_metadata_holds_the_epsilon(lstm_run, tmp_path):
    out, metrics = lstm_run
    best = out / metrics["best_checkpoint"]
    exported = export_to_repository(best, tmp_path / "repo", name="twin", live=False)
    metadata = json.loads(
        (tmp_path / "repo" / "twin" / str(exported.version) / "fintwin.json").read_text()
    )
    assert metadata["privacy"] == read_checkpoint(best)[PRIVACY_KEY]
    assert metadata["privacy"]["epsilon"] <= EPSILON
    assert metadata["metrics"]["privacy/epsilon"] == metrics["privacy/epsilon"]


class ClippingProbe(pl.Callback):
    """Records, at every step, the optimizer, the per-customer gradients before the step and
    the clipped sum the DP optimizer took."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for p in pl_module.parameters() if p.requires_grad]
        self.steps.append({
            "optimizer": trainer.optimizers[0],
            "params": params,
            "grad_samples": [p.grad_sample.detach().clone() for p in params],
        })

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = self.steps[-1]
        step["batch_size"] = batch["length"].shape[0]
        step["summed"] = [p.summed_grad.detach().clone() for p in step["params"]]


def test_per_customer_gradients_are_clipped(tmp_path, events_csv):
    """The optimizer is Opacus' DPOptimizer; every parameter has one gradient per customer of
    the batch, and the step sums them clipped to max_grad_norm (0.01: every one is clipped)."""
    cfg = compose_cfg(tmp_path, private_overrides(events_csv, "lstm")
                      + ["privacy.max_grad_norm=0.01", "test=false"])
    datamodule, model, trainer = build(cfg)
    probe = ClippingProbe()
    trainer.callbacks.append(probe)
    trainer.fit(model, datamodule=datamodule)
    assert probe.steps
    for step in probe.steps:
        assert isinstance(step["optimizer"], DPOptimizer)
        assert all(g.shape[0] == step["batch_size"] for g in step["grad_samples"])
        flat = torch.cat([g.flatten(1) for g in step["grad_samples"]], dim=1)
        norms = flat.norm(dim=1)
        assert (norms > 0.01).all()
        factor = (0.01 / (norms + 1e-6)).clamp(max=1.0)
        for grad_sample, summed in zip(step["grad_samples"], step["summed"], strict=True):
            expected = torch.einsum("i,i...->...", factor, grad_sample)
            torch.testing.assert_close(summed, expected, rtol=1e-4, atol=1e-7)
    assert type(model.encoder.lstm) is nn.LSTM  # the plain layer is back after fitting
    callback = next(c for c in trainer.callbacks if isinstance(c, DifferentialPrivacy))
    assert callback.spent()["max_grad_norm"] == 0.01


def test_an_empty_poisson_batch_costs_nothing(tmp_path, events_csv):
    """A Poisson draw of no customer is a batch of none: loss 0, finite."""
    datamodule, model, _ = build(compose_cfg(tmp_path, private_overrides(events_csv, "lstm")))
    collate = datamodule.train_dataloader().collate_fn
    first = collate([0, 1, 2])
    empty = collate([])
    assert empty["length"].shape == (0,) and empty["event_type"].shape[1:] == first[
        "event_type"
    ].shape[1:]
    loss = model.loss(empty)
    assert torch.isfinite(loss) and float(loss) == 0.0


def test_default_runs_are_not_private(tmp_path, events_csv):
    cfg = compose_cfg(tmp_path, tiny_overrides(events_csv, "lstm"))
    assert cfg.privacy is None and cfg.data.poisson_sampling is False
    datamodule, _, trainer = build(cfg)
    assert not any(isinstance(c, DifferentialPrivacy) for c in trainer.callbacks)
    assert not datamodule.poisson_sampling


@pytest.mark.parametrize(
    "override, key",
    [
        ("privacy.target_epsilon=0", "privacy.target_epsilon"),
        ("privacy.target_epsilon=-1", "privacy.target_epsilon"),
        ("privacy.target_delta=1.0", "privacy.target_delta"),
        ("privacy.target_delta=0", "privacy.target_delta"),
        ("privacy.max_grad_norm=0", "privacy.max_grad_norm"),
        ("privacy.accountant=moments", "privacy.accountant"),
        ("+privacy.epsilon=3", "privacy.epsilon"),
        ("trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val"),
        ("+trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches"),
        ("trainer.precision=bf16-mixed", "trainer.precision"),
        ("trainer.max_epochs=-1", "trainer.max_epochs"),
        ("model.compile=true", "model.compile"),
        ("data.bucket_by_length=true", "data.bucket_by_length"),
        ("data.poisson_sampling=false", "data.poisson_sampling"),
        ("ckpt_path=last.ckpt", "ckpt_path"),
    ],
)
def test_bad_private_configs_name_the_key(tmp_path, events_csv, override, key):
    cfg = compose_cfg(tmp_path, private_overrides(events_csv, "lstm") + [override])
    with pytest.raises(FintwinInputError, match=key.replace(".", r"\.")):
        run(cfg)


def test_default_delta_is_well_below_one_over_n():
    config = PrivacyConfig(target_epsilon=1.0)
    assert config.delta_for(1000) == 1e-5
    assert config.delta_for(1_000_000) == pytest.approx(1e-7)
    assert PrivacyConfig(target_delta=1e-3).delta_for(10) == 1e-3
