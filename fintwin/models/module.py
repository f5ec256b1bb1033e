"""LightningModule for customer twins: encoder + heads, losses, metrics, serving outputs.

Loss (weights from ``loss_weights``): every term is summed over the batch and divided by
the batch size times the mean number of such terms per training customer
(``scaling["*_per_customer"]``, see ``loss_terms_per_customer``), so each event weighs the
same whichever batch it falls in and the loss is the per-event likelihood the metrics
report; a per-batch mean would overweight the events of batches of short sequences, which
length bucketing creates. The logged ``*_nll`` metrics are per observed next event over
the whole epoch, as an oracle reports:

- ``type``: -log p(next type), observed next events only.
- ``time``: -(sum of log p(gap) over observed gaps, dormancy included, + sum of censored
  log-survival terms at each row's last event) / (observed + censored terms).
- ``amount``: -log p(next amount | true next type), observed next events only.
- ``churn``: binary cross-entropy on ``churn_label`` where ``churn_mask``.
- ``horizon``: Poisson NLL of the event count + Tweedie (power 1.5) deviance of the spend
  (in units of a typical amount) in a ``horizon_days`` window that starts after a silence
  drawn at each ``horizon_mask`` position (``silent_window_targets``): uniform over the
  silences the data can show whole windows for in training, half of the longest in
  validation and test. The head thus learns to forecast from any point of a customer's
  silence, e.g. a cut-off, not only right after an event.
  Tweedie handles the point mass at zero spend and the heavy right tail, and its log-link
  output is the expected spend itself (no retransformation bias as with MSE on log1p).

Logged per stage (``train`` | ``val`` | ``test``): ``{stage}/loss`` and
``{stage}/loss_{type,time,amount,churn,horizon_count,horizon_spend}`` (unweighted), and
the epoch-level torchmetrics ``{stage}/{name}``. Validation and test score every batch;
training logs ``train/loss`` every step but the loss terms and metrics only every
``trainer.log_every_n_steps``-th batch (an unbiased subsample that keeps the per-step cost
that of the loss):

- ``type_acc``, ``type_acc5``: top-1 / top-5 accuracy of the next type.
- ``type_nll``, ``time_nll``, ``amount_nll``, ``event_nll``: summed over the epoch, then
  divided by the number of observed next events (not a mean of batch means).
  ``time_nll`` includes the censored survival terms in its numerator;
  ``event_nll = type_nll + time_nll + amount_nll``, the same terms a simulator oracle
  scores (see ``per_event_log_likelihood``).
- ``time_mae``: |median(gap | return) - observed gap| in days, observed next events (the
  median is the MAE-optimal point forecast; the heavy-tailed mixture's mean is not).
- ``amount_mae``: |expected next amount (marginal over the type, as served) - observed
  amount|, observed next events.
- ``churn_auroc``: AUROC of ``churn_prob`` where ``churn_mask`` (``BinnedAUROC``: 200 bins,
  constant memory).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from pytorch_lightning.utilities.enums import GradClipAlgorithmType
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from fintwin.models.encoders import build_encoder, elapsed_days, gather_last, sequence_mask
from fintwin.models.heads import (
    AmountDistribution,
    AmountHead,
    ChurnHead,
    GapDistribution,
    HorizonHead,
    HorizonPrediction,
    TimeHead,
    TypeHead,
    at_positions,
)

LOSS_TERMS = ("type", "time", "amount", "churn", "horizon")
QUANTILE_LEVELS = (0.1, 0.5, 0.9)
AUROC_THRESHOLDS = 200


def to_plain(value: object) -> object:
    """Recursively turn config containers / numpy / tensor values into plain Python.

    Hyperparameters must be plain so checkpoints load with ``weights_only=True``.
    """
    if isinstance(value, Mapping):
        return {str(key): to_plain(item) for key, item in value.items()}
    if isinstance(value, str | bytes):
        return value
    if isinstance(value, Sequence):
        return [to_plain(item) for item in value]
    if hasattr(value, "tolist"):
        return to_plain(value.tolist())
    return value


def warmup_cosine(step: int, warmup_steps: int, total_steps: float) -> float:
    """Learning-rate factor: linear warmup, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not math.isfinite(total_steps):
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1.0, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class RatioMetric(torchmetrics.Metric):
    """Sum of numerators over sum of denominators across batches (and processes)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("numerator", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("denominator", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, numerator: Tensor, denominator: Tensor) -> None:
        self.numerator += numerator.detach().float().sum()
        self.denominator += denominator.detach().float().sum()

    def compute(self) -> Tensor:
        return self.numerator / self.denominator


class BinnedAUROC(torchmetrics.Metric):
    """AUROC of probabilities from per-bin counts of positives and negatives (``bins`` equal
    bins of [0, 1]; pairs in one bin count half, the Mann-Whitney statistic of the binned
    scores). Constant memory, and its counts come from a sort, so it stays O(n) in memory
    and fast under deterministic algorithms (torchmetrics' binned AUROC then counts through
    an n x thresholds x 4 * thresholds mesh: gigabytes for one validation batch)."""

    full_state_update = False

    def __init__(self, bins: int = AUROC_THRESHOLDS) -> None:
        super().__init__()
        self.bins = bins
        for name in ("positives", "negatives"):
            self.add_state(name, torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")

    def _counts(self, probs: Tensor) -> Tensor:
        index = (probs.float().clamp(0.0, 1.0) * self.bins).long().clamp(max=self.bins - 1)
        edges = torch.arange(self.bins + 1, device=index.device)
        ends = torch.searchsorted(torch.sort(index).values, edges)  # first >= each bin
        return ends.diff().to(torch.float64)

    def update(self, probs: Tensor, labels: Tensor) -> None:
        positive = labels.bool()
        self.positives += self._counts(probs[positive])
        self.negatives += self._counts(probs[~positive])

    def compute(self) -> Tensor:
        positives, negatives = self.positives.cpu(), self.negatives.cpu()  # 200 numbers
        below = torch.cumsum(negatives, 0) - negatives  # negatives in lower bins
        wins = (positives * (below + 0.5 * negatives)).sum()
        auroc = wins / (positives.sum() * negatives.sum())
        return auroc.float().to(self.positives.device)


def build_metrics(vocab_size: int) -> nn.ModuleDict:
    """The torchmetrics logged per stage (names are the logged names after ``stage/``)."""
    return nn.ModuleDict(
        {
            "type_acc": MulticlassAccuracy(vocab_size, top_k=1, average="micro"),
            "type_acc5": MulticlassAccuracy(vocab_size, top_k=min(5, vocab_size), average="micro"),
            "type_nll": RatioMetric(),
            "time_nll": RatioMetric(),
            "time_mae": torchmetrics.MeanAbsoluteError(),
            "amount_nll": RatioMetric(),
            "amount_mae": torchmetrics.MeanAbsoluteError(),
            "event_nll": RatioMetric(),
            "churn_auroc": BinnedAUROC(),
        }
    )


@dataclass
class HeadOutputs:
    """All head outputs for hidden states ``[..., H]``."""

    type_logits: Tensor
    gap: GapDistribution
    amount: AmountDistribution
    churn_logit: Tensor
    horizon: HorizonPrediction


def observed_next_events(batch: Mapping[str, Tensor]) -> Tensor:
    """``[B, T]`` positions whose next event was observed before the cut-off."""
    valid = sequence_mask(batch["length"], batch["event_type"].shape[1])
    return valid & ~batch["gap_censored"] & (batch["next_type"] > 0)


def silent_window_targets(
    batch: Mapping[str, Tensor], horizon_days: float, fraction: Tensor | float
) -> dict[str, Tensor]:
    """Horizon targets after a silence: ``[B, T]`` ``elapsed``, ``count``, ``spend``, ``mask``.

    At each ``horizon_mask`` position ``i`` (a whole window fits before the end of
    observation) the silence is ``elapsed = fraction * room`` with ``room = min(next gap,
    end - t_i - horizon_days)``: the customer has had no event for ``elapsed`` days, and the
    window ``(t_i + elapsed, t_i + elapsed + horizon_days]`` is observed. ``count`` and
    ``spend`` are the events and amounts of the row in it. ``fraction`` in ``[0, 1)`` keeps
    the silence before the next event; 0 gives the window right after the event. Times are
    the encoders' ``elapsed_days`` (only their differences matter) and the censored elapsed
    time of the row's last event.
    """
    width = batch["delta_t"].shape[1]
    valid = sequence_mask(batch["length"], width)
    times = elapsed_days(batch).float()
    next_gap = batch["next_gap"].float()
    last = (batch["length"] - 1).clamp(min=0)[:, None]
    end = times.gather(1, last) + next_gap.gather(1, last)
    mask = batch["horizon_mask"] & valid
    room = torch.minimum(next_gap, end - times - horizon_days).clamp(min=0.0)
    elapsed = torch.where(mask, torch.as_tensor(fraction, dtype=room.dtype) * room, 0.0)
    later = torch.arange(width, device=valid.device)
    after_i = (later[None, None, :] > later[None, :, None]) & valid[:, None, :]
    offset = times[:, None, :] - times[:, :, None]  # [B, i, j]: t_j - t_i
    inside = after_i & (offset <= (elapsed + horizon_days)[:, :, None])
    amounts = torch.where(valid, batch["amount"].float(), 0.0)
    return {
        "elapsed": elapsed,
        "count": torch.where(mask, inside.sum(dim=-1).float(), 0.0),
        "spend": torch.where(mask, (inside * amounts[:, None, :]).sum(dim=-1), 0.0),
        "mask": mask,
    }


class TwinModule(pl.LightningModule):
    """Customer twin: causal encoder + next-event, churn and horizon heads.

    Args:
        encoder: ``{"name": "lstm" | "transformer", **architecture kwargs}`` (see
            ``fintwin.models.encoders``); built here with the vocabulary and scaling.
        vocab_size: number of event-type ids, padding (0) and OOV (1) included.
        scaling: scaling statistics fitted on calibration data (see the batch contract).
        horizon_days: horizon of the churn and horizon targets (stored for metadata).
        n_numeric: number of extra numeric features ``F``.
        categorical_sizes: vocabulary size of each categorical feature (padding and OOV
            included), in the order of ``batch["categorical"]``'s last axis.
        n_components: log-normal mixture components of the time head.
        loss_weights: weights of ``type, time, amount, churn, horizon`` (default 1 each).
        lr, weight_decay, warmup_steps: AdamW with linear warmup and cosine decay over
            ``trainer.estimated_stepping_batches``.
        compile: ``torch.compile`` the encoder for training.
    """

    def __init__(
        self,
        encoder: Mapping[str, object],
        vocab_size: int,
        scaling: Mapping[str, object],
        horizon_days: float = 90.0,
        n_numeric: int = 0,
        n_components: int = 8,
        loss_weights: Mapping[str, float] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        compile: bool = False,
        categorical_sizes: Sequence[int] = (),
    ) -> None:
        encoder = to_plain(encoder)
        scaling = to_plain(scaling)
        categorical_sizes = [int(size) for size in to_plain(categorical_sizes)]
        loss_weights = {term: 1.0 for term in LOSS_TERMS} | to_plain(loss_weights or {})
        unknown = sorted(set(loss_weights) - set(LOSS_TERMS))
        if unknown:
            raise ValueError(f"unknown loss_weights {unknown}; expected keys from {LOSS_TERMS}")
        if "name" not in encoder:
            raise ValueError("encoder config needs a 'name' (lstm | transformer)")
        super().__init__()
        self.save_hyperparameters()
        encoder_kwargs = {key: value for key, value in encoder.items() if key != "name"}
        self.encoder = build_encoder(
            encoder["name"], vocab_size, scaling, n_numeric=n_numeric,
            categorical_sizes=categorical_sizes, **encoder_kwargs,
        )
        hidden = self.encoder.hidden_size
        self.type_head = TypeHead(hidden, vocab_size)
        self.time_head = TimeHead(
            hidden, n_components, loc_offset=scaling.get("gap_log_mean", scaling["delta_t_mean"]),
            loc_spread=scaling.get("gap_log_std", 1.0),
            dormancy_init=scaling.get("dormancy_init", 0.5))
        self.amount_head = AmountHead(hidden, vocab_size, loc_offset=scaling["amount_mean"])
        self.churn_head = ChurnHead(hidden)
        self.horizon_head = HorizonHead(
            hidden,
            spend_unit=math.exp(scaling["amount_mean"]),
            horizon_days=horizon_days,
            max_elapsed=float(scaling.get("horizon_max_elapsed", math.inf)),
        )
        self.register_buffer("quantile_levels", torch.tensor(QUANTILE_LEVELS), persistent=False)
        self.train_metrics = build_metrics(vocab_size)
        self.val_metrics = build_metrics(vocab_size)
        self.test_metrics = build_metrics(vocab_size)
        self._clip_share = 1.0  # of the batch being trained on: configure_gradient_clipping

    # ----------------------------------------------------------------- model
    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """``[B, T, H]`` hidden states."""
        return self.encoder(batch)

    def head_outputs(self, hidden: Tensor, horizon_elapsed: Tensor | None = None) -> HeadOutputs:
        """Every head applied to hidden states ``[..., H]`` (e.g. ``state["hidden"]``); the
        horizon head's window starts ``horizon_elapsed`` ``[...]`` days after the event (0)."""
        return HeadOutputs(
            type_logits=self.type_head(hidden),
            gap=self.time_head(hidden),
            amount=self.amount_head(hidden),
            churn_logit=self.churn_head(hidden),
            horizon=self.horizon_head(hidden, horizon_elapsed),
        )

    def contract_sizes(self) -> dict[str, int | list[int]]:
        """This model's sizes of the exported contract's fixed axes and per-feature bounds
        (CONTRACT.md)."""
        categorical_sizes = list(self.hparams.get("categorical_sizes", []))
        return {
            "vocab_size": int(self.hparams.vocab_size),
            "quantiles": len(QUANTILE_LEVELS),
            "numeric_features": int(self.hparams.n_numeric),
            "categorical_features": len(categorical_sizes),
            "categorical_sizes": categorical_sizes,
        }

    def predict_last(
        self, batch: Mapping[str, Tensor], names: Collection[str] | None = None
    ) -> dict[str, Tensor]:
        """Per-customer serving outputs at each row's last real event (export friendly), named
        as the contract's outputs (CONTRACT.md), all of them or only ``names``; the horizon
        outputs are for the window after ``batch["days_since_last_event"]`` ``[B]`` days of
        silence since that event (right after it when absent)."""
        hidden = gather_last(self(batch), batch["length"])
        return self.serving_outputs(hidden, batch.get("days_since_last_event"), names)

    def serving_outputs(self, hidden: Tensor, days_since_last_event: Tensor | None = None,
                        names: Collection[str] | None = None) -> dict[str, Tensor]:
        """The contract's outputs (all, or only ``names``) from hidden states ``[B, H]`` at
        customers' last events (``predict_last``; the live step model after each event)."""
        return self.contract_outputs(self.head_outputs(hidden, days_since_last_event), names)

    def contract_outputs(self, out: HeadOutputs,
                         names: Collection[str] | None = None) -> dict[str, Tensor]:
        """The contract's outputs (all, or only ``names``) of the heads' ``out``."""
        probs = torch.softmax(out.type_logits, dim=-1)
        outputs = {
            "next_event_probs": lambda: probs,
            "next_time_mean": out.gap.mean,
            "next_time_quantiles": lambda: out.gap.quantiles(self.quantile_levels),
            "dormant_prob": lambda: out.gap.dormant_prob,
            "next_amount_mean": lambda: out.amount.marginal_mean(probs),
            "churn_prob": lambda: torch.sigmoid(out.churn_logit),
            "horizon_count": lambda: out.horizon.count,
            "horizon_spend": lambda: out.horizon.spend,
        }
        return {name: make() for name, make in outputs.items() if names is None or name in names}

    # ------------------------------------------------------------ likelihood
    def _log_likelihood(self, batch: Mapping[str, Tensor], out: HeadOutputs) -> dict[str, Tensor]:
        valid = sequence_mask(batch["length"], batch["event_type"].shape[1])
        censored = batch["gap_censored"] & valid
        observed = observed_next_events(batch)
        next_type = batch["next_type"].clamp(min=1)
        type_ll = torch.log_softmax(out.type_logits, dim=-1).gather(-1, next_type[..., None])
        zero = out.type_logits.new_zeros(observed.shape)
        return {
            "type": torch.where(observed, type_ll.squeeze(-1), zero),
            "gap": torch.where(observed, out.gap.log_prob(batch["next_gap"]), zero),
            "amount": torch.where(
                observed, out.amount.log_prob(batch["next_amount"], next_type), zero
            ),
            "censored": torch.where(censored, out.gap.log_survival(batch["next_gap"]), zero),
            "observed": observed,
            "censored_mask": censored,
        }

    def per_event_log_likelihood(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``[B, T]`` log-likelihood terms, zero where their mask is False.

        ``type``, ``gap`` (dormancy included) and ``amount`` (given the true type) at
        ``observed`` positions; ``censored`` (log survival of the censored elapsed time) at
        ``censored_mask`` positions. The joint event NLL is ``-(type + gap + amount +
        censored).sum() / observed.sum()``.
        """
        return self._log_likelihood(batch, self.head_outputs(self(batch)))

    # ------------------------------------------------------------------ loss
    def _loss_normalisers(self, batch_size: int) -> dict[str, float]:
        """Expected loss terms in a batch of ``batch_size`` customers (see the module doc);
        an empty batch (a Poisson draw of no customer) counts as one, so its loss is 0."""
        scaling = self.hparams.scaling
        return {
            name: max(batch_size, 1) * max(float(scaling.get(f"{name}_per_customer", 1.0)), 1e-6)
            for name in ("events", "time_terms", "churn_terms", "horizon_terms")
        }

    def _losses(
        self,
        batch: Mapping[str, Tensor],
        out: HeadOutputs,
        ll: dict[str, Tensor],
        window: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        norm = self._loss_normalisers(batch["event_type"].shape[0])
        valid = sequence_mask(batch["length"], batch["event_type"].shape[1])
        churn_mask = batch["churn_mask"] & valid
        horizon_mask = window["mask"]
        zero = out.churn_logit.new_zeros(())
        churn = F.binary_cross_entropy_with_logits(
            out.churn_logit, batch["churn_label"].float(), reduction="none"
        )
        count_nll, spend_deviance = self.horizon_head.losses(
            out.horizon, window["count"], window["spend"]
        )
        return {
            "type": -ll["type"].sum() / norm["events"],
            "time": -(ll["gap"].sum() + ll["censored"].sum()) / norm["time_terms"],
            "amount": -ll["amount"].sum() / norm["events"],
            "churn": torch.where(churn_mask, churn, zero).sum() / norm["churn_terms"],
            "horizon_count": torch.where(horizon_mask, count_nll, zero).sum()
            / norm["horizon_terms"],
            "horizon_spend": torch.where(horizon_mask, spend_deviance, zero).sum()
            / norm["horizon_terms"],
        }

    def _total_loss(self, losses: dict[str, Tensor]) -> Tensor:
        weights = self.hparams.loss_weights
        horizon = losses["horizon_count"] + losses["horizon_spend"]
        return (
            weights["type"] * losses["type"]
            + weights["time"] * losses["time"]
            + weights["amount"] * losses["amount"]
            + weights["churn"] * losses["churn"]
            + weights["horizon"] * horizon
        )

    @torch.no_grad()
    def _update_metrics(
        self,
        metrics: nn.ModuleDict,
        batch: Mapping[str, Tensor],
        out: HeadOutputs,
        ll: dict[str, Tensor],
    ) -> None:
        observed = ll["observed"]
        n_observed = observed.sum()
        logits = out.type_logits[observed].detach()
        if logits.shape[0] > 0:  # a batch of single-event customers has no next event
            metrics["type_acc"].update(logits, batch["next_type"][observed])
            metrics["type_acc5"].update(logits, batch["next_type"][observed])
            median = at_positions(out.gap, observed).quantiles(logits.new_tensor([0.5]))[:, 0]
            metrics["time_mae"].update(median, batch["next_gap"][observed])
            amount_mean = at_positions(out.amount, observed).marginal_mean(
                torch.softmax(logits, dim=-1)
            )
            metrics["amount_mae"].update(amount_mean, batch["next_amount"][observed])
        metrics["type_nll"].update(-ll["type"].sum(), n_observed)
        metrics["time_nll"].update(-(ll["gap"].sum() + ll["censored"].sum()), n_observed)
        metrics["amount_nll"].update(-ll["amount"].sum(), n_observed)
        event_ll = ll["type"] + ll["gap"] + ll["amount"] + ll["censored"]
        metrics["event_nll"].update(-event_ll.sum(), n_observed)
        churn_mask = batch["churn_mask"] & sequence_mask(batch["length"], observed.shape[1])
        metrics["churn_auroc"].update(
            torch.sigmoid(out.churn_logit[churn_mask]).detach(),
            batch["churn_label"][churn_mask].long(),
        )

    def _logs_details(self, stage: str, batch_idx: int) -> bool:
        """Whether this step logs the loss terms and updates the torchmetrics.

        Validation and test steps always do; training steps only every
        ``trainer.log_every_n_steps``-th batch, so the epoch's ``train/*`` metrics are
        estimated on that subsample while the per-step cost stays that of the loss alone.
        """
        if stage != "train" or self._trainer is None:
            return True
        return batch_idx % max(1, self.trainer.log_every_n_steps) == 0

    def _forward_losses(
        self, batch: Mapping[str, Tensor]
    ) -> tuple[HeadOutputs, dict[str, Tensor], dict[str, Tensor], Tensor]:
        window = silent_window_targets(
            batch, self.horizon_head.horizon_days, self._silence_fraction(batch)
        )
        out = self.head_outputs(self(batch), window["elapsed"])
        ll = self._log_likelihood(batch, out)
        losses = self._losses(batch, out, ll, window)
        return out, ll, losses, self._total_loss(losses)

    def _silence_fraction(self, batch: Mapping[str, Tensor]) -> Tensor | float:
        """Where in each position's possible silence the horizon window starts: uniform
        draws in training (a new point every epoch), the middle otherwise (a fixed score)."""
        if self.training:
            return torch.rand(batch["delta_t"].shape, device=batch["delta_t"].device)
        return 0.5

    def loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The weighted multi-task loss of a batch, without logging or metrics."""
        return self._forward_losses(batch)[-1]

    def _shared_step(self, batch: Mapping[str, Tensor], batch_idx: int, stage: str) -> Tensor:
        out, ll, losses, loss = self._forward_losses(batch)
        batch_size = batch["event_type"].shape[0]
        on_step, sync = stage == "train", stage != "train"
        log = partial(self.log, batch_size=batch_size, sync_dist=sync)
        log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True)
        if not self._logs_details(stage, batch_idx):
            return loss
        for name, value in losses.items():
            log(f"{stage}/loss_{name}", value, on_step=on_step, on_epoch=True)
        metrics = getattr(self, f"{stage}_metrics")
        self._update_metrics(metrics, batch, out, ll)
        for name, metric in metrics.items():
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        self._clip_share = self.batch_share(batch)
        return self._shared_step(batch, batch_idx, "train")

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, batch_idx, "val")

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, batch_idx, "test")

    def predict_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self.predict_last(batch)

    # ------------------------------------------------------------- training
    def batch_share(self, batch: Mapping[str, Tensor]) -> float:
        """The batch's real events over those expected of as many average customers: the
        size of its loss (and so of its gradient) relative to a random batch's (about 1)."""
        per_customer = float(self.hparams.scaling.get("time_terms_per_customer", 0.0))
        rows = batch["length"].shape[0]
        if per_customer <= 0 or rows == 0:
            return 1.0
        return float(batch["length"].sum()) / (rows * per_customer)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip at ``gradient_clip_val`` times the batch's share of events (``batch_share``).

        A batch's gradient grows with its events; one threshold for all would scale a
        length-bucketed batch of long histories down far more than one of short histories,
        and the short customers' side of the likelihood (e.g. a high dormancy) would win.
        A share-scaled threshold scales every batch alike, so bucketing stays unbiased.
        """
        if gradient_clip_val:
            self.trainer.precision_plugin.clip_gradients(
                optimizer,
                gradient_clip_val * self._clip_share,
                GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM),
            )

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.compile:
            self.encoder.compile()

    def configure_optimizers(self) -> dict[str, object]:
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
        )
        schedule = partial(
            warmup_cosine,
            warmup_steps=max(1, self.hparams.warmup_steps),
            total_steps=float(self.trainer.estimated_stepping_batches),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
