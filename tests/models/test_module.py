"""TwinModule: likelihood terms, losses, metrics, training, checkpoints, ONNX export."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fintwin.data.contract import OUTPUT_NAMES
from fintwin.export.graph import ExportableTwin
from fintwin.models.encoders import gather_last
from fintwin.models.module import BinnedAUROC, TwinModule
from fintwin.twin.rollout import (
    N_NOISE,
    TYPE,
    categorical_cdf,
    draw_categorical,
    sample_amount,
    sample_gap,
)

LOGGED_METRICS = (
    "type_acc",
    "type_acc5",
    "type_nll",
    "time_nll",
    "time_mae",
    "amount_nll",
    "amount_mae",
    "event_nll",
    "churn_auroc",
)
LOSS_COMPONENTS = ("type", "time", "amount", "churn", "horizon_count", "horizon_spend")


def _repeating_batch(make_batch) -> dict[str, torch.Tensor]:
    """Event types cycle 2, 3, 4, 5 (each row starts at another phase): the next type is
    a function of the current one."""
    types = np.array([np.roll([2, 3, 4, 5] * 3, row) for row in range(4)])
    return make_batch([12, 12, 10, 8], event_types=types, seed=0)


@torch.no_grad()
def test_censored_positions_contribute_only_survival(make_module, make_batch, encoder_config):
    module = make_module(encoder_config)
    batch = make_batch([5, 3, 1], max_len=6, seed=1)
    terms = module.per_event_log_likelihood(batch)
    last = batch["length"] - 1
    rows = torch.arange(3)
    assert terms["censored_mask"][rows, last].all() and terms["censored_mask"].sum() == 3
    assert terms["observed"].sum() == 4 + 2 + 0
    for key in ("type", "gap", "amount"):
        assert torch.all(terms[key][~terms["observed"]] == 0)
    assert torch.all(terms["censored"][~terms["censored_mask"]] == 0)
    # The survival term is log(p_d + (1 - p_d) S(c)) of the head at the last event.
    gap = module.head_outputs(gather_last(module(batch), batch["length"])).gap
    expected = gap.log_survival(batch["next_gap"][rows, last])
    torch.testing.assert_close(terms["censored"][rows, last], expected)
    # Whatever sits in the type/amount targets of censored positions is ignored.
    tampered = {**batch, "next_type": batch["next_type"].clone()}
    tampered["next_amount"] = batch["next_amount"].clone()
    tampered["next_type"][rows, last] = 3
    tampered["next_amount"][rows, last] = 99.0
    for key, value in module.per_event_log_likelihood(tampered).items():
        torch.testing.assert_close(value, terms[key])


@torch.no_grad()
def test_metrics_equal_the_per_event_likelihood(make_module, make_batch, encoder_config):
    """event_nll = type_nll + time_nll + amount_nll, all per observed next event."""
    module = make_module(encoder_config)
    batches = [make_batch([6, 4, 2], seed=2), make_batch([3, 7], seed=3)]
    totals = dict.fromkeys(("type", "time", "amount"), 0.0)
    n_observed = 0
    for i, batch in enumerate(batches):
        module.validation_step(batch, i)
        terms = module.per_event_log_likelihood(batch)
        totals["type"] -= float(terms["type"].sum())
        totals["time"] -= float(terms["gap"].sum() + terms["censored"].sum())
        totals["amount"] -= float(terms["amount"].sum())
        n_observed += int(terms["observed"].sum())
    metrics = {name: float(metric.compute()) for name, metric in module.val_metrics.items()}
    for name, total in totals.items():
        assert metrics[f"{name}_nll"] == pytest.approx(total / n_observed, rel=1e-5)
    assert metrics["event_nll"] == pytest.approx(sum(totals.values()) / n_observed, rel=1e-5)
    assert 0.0 <= metrics["type_acc"] <= metrics["type_acc5"] <= 1.0


@torch.no_grad()
def test_predict_last_reads_each_rows_last_event(make_module, make_batch, encoder_config):
    module = make_module(encoder_config, n_numeric=2)
    batch = make_batch([4, 1, 6], max_len=6, n_numeric=2, seed=4)
    out = module.predict_last(batch)
    assert set(out) == set(OUTPUT_NAMES)
    assert out["next_event_probs"].shape == (3, 7)
    assert out["next_time_quantiles"].shape == (3, 3)
    for name in set(OUTPUT_NAMES) - {"next_event_probs", "next_time_quantiles"}:
        assert out[name].shape == (3,)
    torch.testing.assert_close(out["next_event_probs"].sum(-1), torch.ones(3))
    assert torch.all(out["next_event_probs"][:, 0] == 0)
    assert torch.all(out["next_time_quantiles"].diff(dim=-1) > 0)
    for name in ("dormant_prob", "churn_prob"):
        assert torch.all((out[name] > 0) & (out[name] < 1))
    # Row 1 alone, unpadded, gives the same outputs as inside the padded batch.
    single = {
        key: value[1:2, :1] if value.dim() > 1 else value[1:2] for key, value in batch.items()
    }
    for name, value in module.predict_last(single).items():
        torch.testing.assert_close(value[0], out[name][1], atol=1e-5, rtol=1e-5)


def _sample_next_event(module: TwinModule, hidden: torch.Tensor, seed: int) -> dict:
    """The rollout's draw of the next event at every row of ``hidden``."""
    noise = torch.rand((len(hidden), N_NOISE), generator=torch.Generator().manual_seed(seed))
    rows = torch.arange(len(hidden))
    event_type = draw_categorical(categorical_cdf(module.type_head(hidden)), noise[:, TYPE])
    return {
        "event_type": event_type,
        "gap": sample_gap(module.time_head(hidden), rows, noise),
        "amount": sample_amount(module.amount_head(hidden), rows, event_type, noise),
    }


@torch.no_grad()
def test_sampled_events_feed_back_into_the_state(make_module, make_batch, encoder_config):
    """The rollout protocol: prefix state, expand over samples, sample, step."""
    module = make_module(encoder_config)
    batch = make_batch([4, 2], seed=8)
    state = module.encoder.expand_state(module.encoder.prefix_state(batch), 50)
    draws = [_sample_next_event(module, state["hidden"], seed) for seed in (0, 0, 1)]
    for key in ("event_type", "gap", "amount"):
        torch.testing.assert_close(draws[0][key], draws[1][key])
        assert not torch.equal(draws[0][key], draws[2][key])
    sample = draws[0]
    assert sample["event_type"].shape == (100,) and torch.all(sample["event_type"] >= 1)
    assert torch.all(sample["gap"] >= 1e-3) and torch.all(sample["amount"] >= 0)
    event = {
        "event_type": sample["event_type"],
        "amount": sample["amount"],
        "delta_t": sample["gap"].float(),
        "day_of_week": torch.zeros(100, dtype=torch.int64),
        "day_of_month": torch.ones(100, dtype=torch.int64),
        "hour": torch.zeros(100, dtype=torch.int64),
    }
    hidden, new_state = module.encoder.step(event, state)
    assert hidden.shape == (100, module.encoder.hidden_size)
    torch.testing.assert_close(new_state["hidden"], hidden)


def _time_nll(module: TwinModule, batch: dict[str, torch.Tensor]) -> float:
    """The batch's gap terms, censored survival included (a sum: the module's time loss)."""
    with torch.no_grad():
        terms = module.per_event_log_likelihood(batch)
    return -float(terms["gap"].sum() + terms["censored"].sum())


def test_tiny_batch_overfits(make_module, make_batch, encoder_config):
    """On a deterministic repeating sequence type accuracy reaches 1.0 within 150 steps, the
    type NLL falls below 0.3 nats per event and the gap terms fall at least tenfold (the
    random amounts cannot be memorised, and the horizon windows start at a new random
    silence every step)."""
    module = make_module(encoder_config).eval()
    batch = _repeating_batch(make_batch)
    first = _time_nll(module, batch)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    module.train()
    for _ in range(150):
        loss = module.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()
    with torch.no_grad():
        terms = module.per_event_log_likelihood(batch)
        logits = module.type_head(module(batch))
    observed = terms["observed"]
    accuracy = (logits.argmax(-1) == batch["next_type"])[observed].float().mean()
    assert accuracy == 1.0
    assert -terms["type"].sum() / observed.sum() < 0.3
    assert _time_nll(module, batch) < first / 10


def _loader(batches: list[dict]) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(batches, batch_size=None)


def test_trainer_logs_metrics_and_checkpoint_loads_weights_only(make_batch, tmp_path):
    config = OmegaConf.create(
        {
            "_target_": "fintwin.models.module.TwinModule",
            "encoder": {"name": "transformer", "hidden_size": 8, "num_layers": 1, "num_heads": 2},
            "n_components": 2,
            "loss_weights": {"churn": 0.5},
            "warmup_steps": 1,
        }
    )
    scaling = {
        "amount_mean": np.float64(3.0),
        "amount_std": 1.0,
        "delta_t_mean": 2.0,
        "delta_t_std": 1.0,
    }
    module = instantiate(config, vocab_size=7, scaling=scaling, horizon_days=30.0)
    assert module.hparams.loss_weights == {
        "type": 1.0,
        "time": 1.0,
        "amount": 1.0,
        "churn": 0.5,
        "horizon": 1.0,
    }
    batches = [make_batch([5, 3, 8], seed=5), make_batch([2, 6], seed=6)]
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(module, _loader(batches), _loader(batches[:1]))
    logged = set(trainer.callback_metrics)
    trainer.test(module, _loader(batches[1:]), verbose=False)
    logged |= set(trainer.callback_metrics)
    for stage in ("train", "val", "test"):
        expected = {f"{stage}/loss"} | {f"{stage}/{name}" for name in LOGGED_METRICS}
        expected |= {f"{stage}/loss_{name}" for name in LOSS_COMPONENTS}
        assert expected <= logged, sorted(expected - logged)
    path = tmp_path / "twin.ckpt"
    trainer.save_checkpoint(path)
    loaded = TwinModule.load_from_checkpoint(path, weights_only=True).eval()
    module.eval()
    with torch.no_grad():
        for name, value in loaded.predict_last(batches[0]).items():
            torch.testing.assert_close(value, module.predict_last(batches[0])[name])


def _export_parity(module: TwinModule, make_batch, n_numeric: int) -> None:
    wrapper = ExportableTwin(module)
    with torch.no_grad():
        wrapper(*wrapper.example_inputs())  # an eager run first (LSTM dispatch cache)
    model = wrapper.to_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    numeric = ["numeric"] if n_numeric else []
    assert [i.name for i in session.get_inputs()] == [
        "event_type", "amount", "delta_t", "day_of_week", "day_of_month", "hour", "length",
        "days_since_last_event", *numeric,
    ]
    if n_numeric:
        assert session.get_inputs()[-1].shape == ["batch", "seq", n_numeric]
    for lengths, max_len in (([5, 3, 1, 9], 11), ([1], 1), ([2, 2], 2)):
        batch = make_batch(lengths, max_len=max_len, n_numeric=n_numeric, seed=7)
        batch["days_since_last_event"] = torch.linspace(0.0, 400.0, len(lengths))
        feeds = {name: batch[name].numpy() for name in wrapper.input_names}
        with torch.no_grad():
            expected = wrapper(*(batch[name] for name in wrapper.input_names))
        for name, got, want in zip(OUTPUT_NAMES, session.run(None, feeds), expected, strict=True):
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)


def test_lstm_exports_to_onnx_with_dynamic_axes(make_module, make_batch):
    module = make_module({"name": "lstm", "hidden_size": 8, "num_layers": 2}, n_numeric=2)
    _export_parity(module, make_batch, n_numeric=2)


def test_transformer_exports_to_onnx_with_dynamic_axes(make_module, make_batch):
    encoder = {"name": "transformer", "hidden_size": 8, "num_layers": 2, "num_heads": 2}
    _export_parity(make_module(encoder), make_batch, n_numeric=0)


def test_training_updates_metrics_every_log_interval(make_module, make_batch):
    """With ``log_every_n_steps=2`` the train metrics see batches 0, 2 and 4 only."""
    module = make_module({"name": "lstm", "hidden_size": 8})
    batches = [make_batch([4, 3], seed=seed) for seed in range(5)]
    seen: list[float] = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            denominator = float(pl_module.train_metrics["event_nll"].denominator)
            seen.append(denominator)

    trainer = pl.Trainer(
        max_steps=5,
        log_every_n_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[Probe()],
    )
    trainer.fit(module, _loader(batches))
    observed = [int(module.per_event_log_likelihood(b)["observed"].sum()) for b in batches]
    expected = np.cumsum([n if i % 2 == 0 else 0 for i, n in enumerate(observed)])
    assert seen == expected.tolist()


@torch.no_grad()
def test_loss_weighs_every_event_alike_across_batches(make_module, make_batch, encoder_config):
    """Summed over batches, the loss does not depend on how customers were batched: a
    batch of short sequences weighs its events no more than a batch of long ones."""
    module = make_module(encoder_config)
    short = make_batch([1, 2, 1, 2], max_len=9, seed=1)
    long = make_batch([8, 9], max_len=9, seed=2)
    both = {key: torch.cat([short[key], long[key]]) for key in short}
    combined = module.loss(short) * 4 + module.loss(long) * 2
    torch.testing.assert_close(combined, module.loss(both) * 6)


def test_gradient_clipping_scales_with_the_batchs_share_of_events(make_module, make_batch):
    """A batch of long histories is clipped at a threshold as many times larger as it holds
    more events than a batch of average customers (5 per customer in the test scaling)."""
    module = make_module({"name": "lstm", "hidden_size": 8})
    parameter = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    module.trainer = pl.Trainer(
        gradient_clip_val=1.0, logger=False, enable_progress_bar=False, accelerator="cpu"
    )
    for lengths, share in (([1, 1, 2, 1], 0.25), ([5, 5], 1.0), ([9, 9, 9, 9, 9, 9], 1.8)):
        batch = make_batch(lengths, max_len=9)
        assert module.batch_share(batch) == pytest.approx(share)
        module._clip_share = module.batch_share(batch)
        parameter.grad = torch.full((4,), 10.0)  # norm 20
        module.configure_gradient_clipping(optimizer, 1.0, "norm")
        assert float(parameter.grad.norm()) == pytest.approx(share, rel=1e-4)


@pytest.mark.parametrize("deterministic", [False, True])
def test_binned_auroc_is_the_exact_auroc_of_the_binned_scores(deterministic):
    """Per-bin counts give the Mann-Whitney AUROC of the bin indices (ties count half),
    across updates, in constant memory, with deterministic algorithms on or off."""
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(3_000, generator=generator) ** 2
    labels = (torch.rand(3_000, generator=generator) < probs).long()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        metric = BinnedAUROC(bins=50)
        for part in torch.arange(3_000).chunk(3):
            metric.update(probs[part], labels[part])
        value = float(metric.compute())
    finally:
        torch.use_deterministic_algorithms(previous)
    bins = (probs * 50).long().clamp(max=49).double()
    positive, negative = bins[labels == 1], bins[labels == 0]
    wins = (positive[:, None] > negative[None, :]).double().sum()
    ties = (positive[:, None] == negative[None, :]).double().sum()
    expected = float((wins + 0.5 * ties) / (len(positive) * len(negative)))
    assert value == pytest.approx(expected, abs=1e-6)
    assert metric.positives.sum() == len(positive) and metric.negatives.sum() == len(negative)
