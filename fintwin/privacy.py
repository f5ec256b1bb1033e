"""Differentially private training: DP-SGD with Opacus, planned for a target (epsilon, delta).

The unit of privacy is the customer. Every training example is one customer's whole
calibration history (one sequence per customer), so a batch drawn by Poisson sampling over
sequences (each customer in with probability ``q = data.batch_size / training customers``,
independently, at every step) is a Poisson sample of customers. Each customer's gradient
is clipped to ``max_grad_norm`` before the batch's gradients are summed and Gaussian noise is
added; the accountant then bounds what the weights reveal about any one customer, all of their
events together, as ``(epsilon, delta)``.

What the guarantee covers: the weights trained by gradient steps. The featuriser's
statistics (event-type vocabulary, scaling means and deviations, the longest history, the
dormancy start value) are fitted on the training customers without noise and ship with the
model; validation customers choose the checkpoint and stop training early.

``DifferentialPrivacy`` is the Lightning callback doing the work: it turns each ``nn.LSTM``
into Opacus' ``DPLSTM`` (same parameters, per-sample gradients) for training and back
afterwards, attaches Opacus' per-sample gradient hooks (the transformer's layers, linear maps,
embeddings and layer norms, have them already; its attention mixes positions of one customer
only), wraps the optimizer in a ``DPOptimizer`` with a noise multiplier planned for the run's
steps, and records the spent budget in every checkpoint (``PRIVACY_KEY``).
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import asdict, dataclass, fields
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.layers import DPLSTM
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from fintwin.errors import FintwinInputError
from fintwin.models.checkpoint import PRIVACY_KEY

log = logging.getLogger(__name__)

ACCOUNTANTS = ("prv", "rdp", "gdp")
DEFAULT_DELTA_CAP = 1e-5


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class PrivacyConfig:
    """Budget and clipping of a private run (the ``privacy`` config group).

    ``target_epsilon``: the budget the noise is planned for (the run ends at or below it).
    ``target_delta``: the failure probability; ``None`` takes ``min(1e-5, 0.1 / n)`` for
    ``n`` training customers (well below ``1 / n``). ``max_grad_norm``: each customer's
    gradient is clipped to this L2 norm. ``accountant``: Opacus' ``prv``, ``rdp`` or ``gdp``.
    """

    target_epsilon: float = 8.0
    target_delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "prv"

    def __post_init__(self) -> None:
        if not (_number(self.target_epsilon) and self.target_epsilon > 0):
            raise FintwinInputError(
                f"privacy.target_epsilon={self.target_epsilon!r}: expected a positive number"
            )
        if self.target_delta is not None and not (
            _number(self.target_delta) and 0 < self.target_delta < 1
        ):
            raise FintwinInputError(
                f"privacy.target_delta={self.target_delta!r}: expected a number in (0, 1), or "
                "null for min(1e-5, 0.1 / training customers)"
            )
        if not (_number(self.max_grad_norm) and self.max_grad_norm > 0):
            raise FintwinInputError(
                f"privacy.max_grad_norm={self.max_grad_norm!r}: expected a positive number"
            )
        if self.accountant not in ACCOUNTANTS:
            raise FintwinInputError(
                f"privacy.accountant={self.accountant!r}: expected one of {list(ACCOUNTANTS)}"
            )

    def delta_for(self, n_customers: int) -> float:
        """The delta of a run over ``n_customers`` training customers."""
        if self.target_delta is not None:
            if self.target_delta >= 1 / n_customers:
                log.warning(
                    "privacy.target_delta=%g is not below 1 / %d training customers: the "
                    "guarantee allows revealing a customer outright with that probability",
                    self.target_delta,
                    n_customers,
                )
            return float(self.target_delta)
        return min(DEFAULT_DELTA_CAP, 0.1 / n_customers)


def privacy_config(cfg: DictConfig) -> PrivacyConfig | None:
    """The run's ``privacy`` section as a ``PrivacyConfig`` (``None`` when training is not
    private); unknown keys and bad values are refused naming the key."""
    section = cfg.get("privacy")
    if not section:
        return None
    values = OmegaConf.to_container(section, resolve=True)
    known = [field.name for field in fields(PrivacyConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise FintwinInputError(
            f"config keys {['privacy.' + key for key in unknown]} are unknown; expected "
            f"privacy.{{{', '.join(known)}}}"
        )
    return PrivacyConfig(**values)


def _reject(key: str, value: object, why: str) -> None:
    raise FintwinInputError(f"config key {key}={value!r} is not supported with privacy=dp: {why}")


def check_private_run(cfg: DictConfig) -> None:
    """Refuse, naming the key, bad ``privacy`` values and the options DP-SGD cannot honour or
    account for."""
    privacy_config(cfg)
    trainer = cfg.trainer
    clip = trainer.get("gradient_clip_val")
    if clip not in (None, 0, 0.0):
        _reject("trainer.gradient_clip_val", clip, "per-customer clipping replaces it; set "
                "privacy.max_grad_norm and trainer.gradient_clip_val=null")
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if accumulate != 1:
        _reject("trainer.accumulate_grad_batches", accumulate, "each Poisson batch is one "
                "accounted step; raise data.batch_size instead")
    devices, strategy = trainer.get("devices", 1), trainer.get("strategy", "auto")
    if devices not in (1, "1") or strategy not in (None, "auto"):
        _reject("trainer.devices" if devices not in (1, "1") else "trainer.strategy",
                devices if devices not in (1, "1") else strategy, "private training runs on "
                "one device")
    precision = str(trainer.get("precision", "32-true"))
    if precision not in ("32-true", "32"):
        _reject("trainer.precision", precision, "per-sample gradients are computed in fp32; "
                "set trainer.precision=32-true")
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    if not (isinstance(max_epochs, int) and max_epochs > 0) and not (
        isinstance(max_steps, int) and max_steps > 0
    ):
        _reject("trainer.max_epochs", max_epochs, "the noise is planned for a known number of "
                "steps; set a positive trainer.max_epochs (or trainer.max_steps)")
    if cfg.get("ckpt_path"):
        _reject("ckpt_path", cfg.ckpt_path, "a resumed run would spend the budget again; "
                "start a new run")
    if OmegaConf.select(cfg, "model.compile"):
        _reject("model.compile", True, "Opacus' per-sample gradient hooks need eager modules")
    if not OmegaConf.select(cfg, "data.poisson_sampling"):
        _reject("data.poisson_sampling", False, "the budget is accounted for Poisson batches "
                "of customers")
    if OmegaConf.select(cfg, "data.bucket_by_length"):
        _reject("data.bucket_by_length", True, "batches are Poisson samples of customers")


def to_dp_modules(module: nn.Module) -> None:
    """Replace every ``nn.LSTM`` in ``module`` by a ``DPLSTM`` holding the same weights,
    whose ``state_dict`` keeps ``nn.LSTM``'s keys (checkpoints load into the plain model)."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.LSTM:
                replacement = ModuleValidator.fix(child)
                # DPLSTM's own filter returns a new dict, which torch respects at the root
                # only: nested in a model, both names would reach the checkpoint
                replacement._state_dict_hooks.clear()
                replacement.register_state_dict_post_hook(_drop_internal_names)
                setattr(parent, name, replacement)


def from_dp_modules(module: nn.Module) -> None:
    """Undo ``to_dp_modules``: every ``DPLSTM`` back to an ``nn.LSTM`` with its weights."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DPLSTM):
                lstm = nn.LSTM(
                    child.input_size, child.hidden_size, num_layers=child.num_layers,
                    bias=child.bias, batch_first=child.batch_first, dropout=child.dropout,
                    bidirectional=child.bidirectional,
                )
                lstm.load_state_dict(child.state_dict())
                setattr(parent, name, lstm.to(next(child.parameters()).device))


def _drop_internal_names(module: DPLSTM, state_dict: dict, prefix: str, metadata: Any) -> None:
    """Keep only ``nn.LSTM``'s names of a ``DPLSTM``'s parameters, wherever it is nested."""
    for internal in module.old_to_new:
        state_dict.pop(prefix + internal, None)


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the operating system: the noise and the batches cannot be
    replayed from the run's configured seed."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


@dataclass(frozen=True)
class PrivacyPlan:
    """What a run was planned with: its delta, noise multiplier, sampling rate, steps."""

    delta: float
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    training_customers: int
    expected_batch_size: float


class DifferentialPrivacy(pl.Callback):
    """Trains the LightningModule with DP-SGD (module doc). Needs an ``EventDataModule``
    with ``poisson_sampling=True`` (its ``sample_rate`` and training split)."""

    def __init__(self, config: PrivacyConfig) -> None:
        self.config = config
        self.accountant = create_accountant(mechanism=config.accountant)
        self.plan: PrivacyPlan | None = None
        self._grad_sample: GradSampleModule | None = None
        self._optimizer: DPOptimizer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before the optimizer is built: the DP modules in place, the model checked."""
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if not getattr(datamodule, "poisson_sampling", False):
            raise FintwinInputError(
                "privacy=dp needs the data module's Poisson batches (poisson_sampling=true)"
            )
        to_dp_modules(pl_module)
        errors = ModuleValidator.validate(pl_module, strict=False)
        if errors:
            raise FintwinInputError(
                "privacy=dp: the model has layers without per-sample gradients: "
                + "; ".join(str(error) for error in errors)
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Plan the noise for the run's steps, hook per-sample gradients, wrap the optimizer."""
        datamodule = trainer.datamodule
        n_customers = len(datamodule.splits["train"])
        rate = datamodule.sample_rate
        steps = int(trainer.estimated_stepping_batches)
        delta = self.config.delta_for(n_customers)
        sigma = get_noise_multiplier(
            target_epsilon=self.config.target_epsilon,
            target_delta=delta,
            sample_rate=rate,
            steps=steps,
            accountant=self.config.accountant,
        )
        self.plan = PrivacyPlan(delta, float(sigma), rate, steps, n_customers, rate * n_customers)
        log.info(
            "DP-SGD: epsilon %.3g, delta %.3g over %d steps at sampling rate %.4g: noise "
            "multiplier %.4g, per-customer clipping at %.4g",
            self.config.target_epsilon, delta, steps, rate, sigma, self.config.max_grad_norm,
        )
        self._grad_sample = GradSampleModule(pl_module, batch_first=True, loss_reduction="mean")
        if len(trainer.optimizers) != 1:
            raise FintwinInputError("privacy=dp supports one optimizer")
        self._optimizer = DPOptimizer(
            trainer.optimizers[0],
            noise_multiplier=self.plan.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            expected_batch_size=self.plan.expected_batch_size,
            loss_reduction="mean",
            generator=secret_generator(pl_module.device),
        )
        self._optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=rate))
        trainer.strategy.optimizers = [self._optimizer]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hooks off, the plain optimizer and ``nn.LSTM`` back (testing and export use them)."""
        if self._grad_sample is not None:
            self._grad_sample.remove_hooks()
            self._grad_sample = None
        if self._optimizer is not None:
            trainer.strategy.optimizers = [self._optimizer.original_optimizer]
        from_dp_modules(pl_module)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._grad_sample is not None:
            self._grad_sample.remove_hooks()
            self._grad_sample = None

    def spent(self) -> dict[str, float | int | str]:
        """The budget spent so far (the accountant's epsilon at the plan's delta) and the
        settings it was spent with."""
        if self.plan is None:
            raise RuntimeError("no private fit has started")
        steps = sum(count for _, _, count in self.accountant.history)
        epsilon = self.accountant.get_epsilon(delta=self.plan.delta) if steps else 0.0
        return {
            "epsilon": float(epsilon),
            "delta": self.plan.delta,
            "target_epsilon": float(self.config.target_epsilon),
            "steps": int(steps),
            **{key: value for key, value in asdict(self.plan).items() if key != "delta"},
            "max_grad_norm": float(self.config.max_grad_norm),
            "accountant": self.config.accountant,
            "unit": "customer",
        }

    def metrics(self) -> dict[str, float]:
        """``spent`` as numeric ``privacy/*`` entries of metrics.json."""
        return {f"privacy/{key}": value for key, value in self.spent().items()
                if isinstance(value, int | float)}

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Every checkpoint carries the budget spent up to its step (export copies it)."""
        if self.plan is not None:
            checkpoint[PRIVACY_KEY] = self.spent()
