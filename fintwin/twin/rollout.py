"""Monte Carlo rollouts: simulate each customer's future from a cut-off to a horizon end.

A path starts from the customer's state after their last calibration event and repeats:
sample the next event's type, gap and amount from the heads (and whether the customer goes
dormant instead), then feed the event back into the encoder (LSTM hidden state or
transformer key/value cache: one ``step`` per event, no re-encoding of the history). The
stepped event's inputs are built like the featuriser's: type id, raw amount, days since the
previous event, and day of week / day of month / hour of its absolute timestamp.

Time runs in days after ``start``, the end of the cut-off day (``SequenceSet.observation_end``).
The window is ``[start, end)`` with ``end`` the end of the horizon-end day. What is already
known conditions the first event: nothing happened in the ``c`` days between the last event
and ``start``, so the first gap is drawn from the gap mixture truncated below at ``c``
(component weights ``w_k S_k(c) / S(c)``, then inverse-CDF sampling in the tail), and the
customer is dormant with the Bayes-updated probability
``P(dormant | no event for c days) = p_d / (p_d + (1 - p_d) S(c))``. A path ends when it
goes dormant, when its next event falls at or after ``end``, or after ``max_steps`` events
(such paths are counted as capped: their counts are truncated).

Randomness: every chunk of customers has its own ``torch.Generator`` seeded from
``(seed, chunk index)``, and every step draws the same full-width noise for all paths of the
chunk, finished or not. A path's noise therefore depends only on its position and step, not
on which other paths are still running: runs that differ in some customers' inputs (what-if
scenarios) use common random numbers for every path.

Outcomes are counted over the events the model generates: ``count`` (events), ``spend``
(their amounts) and ``transactions`` (distinct calendar days with an event, the convention
of ``fintwin.twin.evaluation``). Injected events (``ForcedEvents``) shape the paths but are
not outcomes.

Numeric and categorical extra features are inputs the model does not generate. Each
generated event carries the customer's mean numeric values over their (kept) history, and
holds the categorical values of the path's latest event: the customer's last calibration
event's, until an injected event sets others (an injected value of ``PAD_ID`` keeps the held
one), which later generated events then carry.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from fintwin.data.contract import random_inputs, sequence_inputs
from fintwin.data.features import NS_PER_DAY, PAD_ID, Vocab
from fintwin.data.sequences import SequenceSet, observation_end
from fintwin.errors import FintwinInputError
from fintwin.models.encoders import gather_last
from fintwin.models.heads import MIN_GAP_DAYS, AmountDistribution, GapDistribution
from fintwin.models.module import TwinModule

log = logging.getLogger(__name__)

MAX_CHUNK_PATHS = 2**18
# Noise slots per path and step: uniforms for the type, mixture component, dormancy, gap
# (a normal quantile, or the tail probability of the first gap), zero amount, amount value.
TYPE, COMPONENT, DORMANT, GAP, ZERO, AMOUNT = range(6)
N_NOISE = 6
UNIFORM_EPS = 1e-7


@dataclass(frozen=True)
class RolloutConfig:
    """Monte Carlo settings.

    Args:
        samples: paths per customer.
        seed: seed of the per-chunk generators (>= 0).
        max_steps: most events per path; paths still running after it are capped.
        chunk_customers: customers simulated together; ``None`` sizes chunks from
            ``memory_mb`` (see ``chunk_customers``).
        memory_mb: budget for the carried encoder state of one chunk.
        quantiles: levels of the per-customer count and spend quantiles.
        dates_only: the source records dates only, so generated events get hour 0.
        keep_paths: also return every sampled event.
        keep_outcomes: also return every path's transactions and spend (for distributions).
        progress: show a progress bar over chunks.
    """

    samples: int = 100
    seed: int = 0
    max_steps: int = 1000
    chunk_customers: int | None = None
    memory_mb: float = 1024.0
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    dates_only: bool = False
    keep_paths: bool = False
    keep_outcomes: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise FintwinInputError(f"samples={self.samples}: expected a positive integer")
        if self.seed < 0:
            raise FintwinInputError(f"seed={self.seed}: expected a non-negative integer")
        if self.max_steps < 1:
            raise FintwinInputError(f"max_steps={self.max_steps}: expected a positive integer")
        if self.chunk_customers is not None and self.chunk_customers < 1:
            raise FintwinInputError(f"chunk_customers={self.chunk_customers}: expected >= 1")
        if not all(0.0 <= q <= 1.0 for q in self.quantiles):
            raise FintwinInputError(f"quantiles={self.quantiles}: expected levels in [0, 1]")


@dataclass
class ForcedEvents:
    """Injected events inside the window, per customer of a ``SequenceSet``.

    Padded arrays over ``[N customers, K]``: ``time`` in days after the start (``inf`` where a
    customer has fewer events), ``event_type`` ids, raw ``amount``, ``numeric`` ``[N, K, F]``
    (NaN: use the customer's mean, like generated events) and ``categorical`` ids
    ``[N, K, C]`` (``PAD_ID``: keep the held value, like generated events). Rows are in time
    order.
    """

    time: np.ndarray
    event_type: np.ndarray
    amount: np.ndarray
    numeric: np.ndarray
    categorical: np.ndarray

    @classmethod
    def none(cls, n_customers: int, n_numeric: int, n_categorical: int = 0) -> ForcedEvents:
        """No injected events."""
        return cls.empty(n_customers, 0, n_numeric, n_categorical)

    @classmethod
    def empty(cls, n_customers: int, width: int, n_numeric: int, n_categorical: int) -> ForcedEvents:
        """``width`` slots per customer, all unused (time ``inf``; values to fill in)."""
        return cls(
            time=np.full((n_customers, width), np.inf),
            event_type=np.zeros((n_customers, width), np.int64),
            amount=np.zeros((n_customers, width), np.float32),
            numeric=np.full((n_customers, width, n_numeric), np.nan, np.float32),
            categorical=np.full((n_customers, width, n_categorical), PAD_ID, np.int64),
        )

    def chunk(self, index: np.ndarray, device: torch.device) -> dict[str, Tensor]:
        """Rows ``index`` with a trailing sentinel column (time ``inf``), on ``device``."""
        arrays = {
            "time": (self.time, np.inf),
            "event_type": (self.event_type, PAD_ID),
            "amount": (self.amount, 0.0),
            "numeric": (self.numeric, np.nan),
            "categorical": (self.categorical, PAD_ID),
        }
        out = {}
        for name, (values, fill) in arrays.items():
            rows = values[index]
            sentinel = np.full((len(index), 1, *rows.shape[2:]), fill, dtype=rows.dtype)
            out[name] = torch.from_numpy(np.concatenate([rows, sentinel], axis=1)).to(device)
        return out


@dataclass
class ChunkOutcome:
    """Per-path outcomes of one chunk: ``[n customers, samples]`` tensors on the CPU.

    ``customers`` indexes the ``SequenceSet``; ``daily`` ``[n_days]`` is the expected number of
    transactions per day of the window summed over the chunk's customers; ``p_alive`` the
    probability of not being dormant at the start; ``paths`` the sampled events (when kept)
    as arrays ``customer`` (index), ``sample``, ``time`` (days), ``event_type`` (id),
    ``amount``, ``injected``; ``encoder_steps`` the number of path-steps fed to the encoder.
    """

    customers: np.ndarray
    count: Tensor
    spend: Tensor
    transactions: Tensor
    capped: Tensor
    p_alive: Tensor
    daily: Tensor
    steps: int
    encoder_steps: int
    paths: dict[str, np.ndarray] | None = None


@dataclass
class RolloutResult:
    """Rollout summaries.

    ``summary``: one row per customer (index ``customer_id``) with ``expected_count``,
    ``expected_spend``, ``expected_transactions``, ``p_active`` (P(at least one event in the
    window)), each with its Monte Carlo standard error (``*_se``); ``p_alive`` (not dormant at
    the start, exact given the model); ``count_q*`` / ``spend_q*`` quantiles; ``capped_paths``.
    ``daily_transactions``: expected transactions per day of the window, all customers.
    ``paths``: the sampled events when kept (``customer_id``, ``sample``, ``timestamp``,
    ``event_type``, ``amount``, ``injected``). ``path_transactions`` / ``path_spend``: when
    kept, every path's outcomes, ``[customers, samples]`` arrays in the rows of ``summary``.
    """

    summary: pd.DataFrame
    daily_transactions: pd.Series
    start: pd.Timestamp
    end: pd.Timestamp
    samples: int
    n_capped: int
    max_steps_run: int
    encoder_steps: int
    paths: pd.DataFrame | None = None
    path_transactions: np.ndarray | None = None
    path_spend: np.ndarray | None = None

    @property
    def n_paths(self) -> int:
        """Number of simulated paths."""
        return len(self.summary) * self.samples


# --------------------------------------------------------------------------- sampling
def _normal(uniform: Tensor) -> Tensor:
    """Standard normal quantile of a uniform draw."""
    return torch.special.ndtri(uniform.clamp(UNIFORM_EPS, 1.0 - UNIFORM_EPS))


def categorical_cdf(logits: Tensor) -> Tensor:
    """Normalised cumulative probabilities (float64) along the last dim of ``logits``."""
    cdf = torch.cumsum(torch.softmax(logits.double(), dim=-1), dim=-1)
    return cdf / cdf[..., -1:]


def draw_categorical(cdf: Tensor, uniform: Tensor) -> Tensor:
    """Inverse-CDF draw of a category per row of ``cdf`` (``[R, K]``) from ``uniform`` ``[R]``.

    Categories of probability 0 (the padding type) are never drawn.
    """
    index = (cdf <= uniform.double()[:, None]).sum(dim=-1)
    return index.clamp(max=cdf.shape[-1] - 1)


# The samplers below read distribution parameters at ``rows`` (the row of the head outputs
# of each path: at the first step many paths share their customer's row).
def sample_gap(gap: GapDistribution, rows: Tensor, noise: Tensor) -> Tensor:
    """Days to the next event given return (float64), from the mixture."""
    component = draw_categorical(categorical_cdf(gap.log_weights)[rows], noise[:, COMPONENT])
    loc = gap.loc[rows, component]
    scale = torch.exp(gap.log_scale[rows, component])
    return torch.exp(loc + scale * _normal(noise[:, GAP])).clamp(min=MIN_GAP_DAYS).double()


def sample_gap_beyond(
    gap: GapDistribution, elapsed: Tensor, rows: Tensor, noise: Tensor
) -> tuple[Tensor, Tensor]:
    """First gap given no event for ``elapsed`` days, and the posterior dormancy probability.

    The gap (float64) is drawn from the mixture truncated below at ``elapsed``: component ``k``
    with probability ``w_k S_k(c) / S(c)``, then ``z = -Phi^-1(u S_k(c))`` on the log scale.
    The dormancy probability is ``p_d / (p_d + (1 - p_d) S(c))``. ``elapsed`` has one value
    per row of ``gap``.
    """
    loc, log_scale = gap.loc.double(), gap.log_scale.double()
    z_elapsed = (torch.log(elapsed.clamp(min=MIN_GAP_DAYS))[:, None] - loc) * torch.exp(-log_scale)
    log_tail = torch.special.log_ndtr(-z_elapsed)
    log_posterior = gap.log_weights.double() + log_tail
    component = draw_categorical(categorical_cdf(log_posterior)[rows], noise[:, COMPONENT])
    log_q = torch.log(1.0 - noise[:, GAP].double()) + log_tail[rows, component]
    z = -torch.special.ndtri(torch.exp(log_q))
    value = torch.exp(loc[rows, component] + torch.exp(log_scale[rows, component]) * z)
    log_dormant = torch.nn.functional.logsigmoid(gap.dormant_logit.double())
    log_alive = torch.nn.functional.logsigmoid(-gap.dormant_logit.double()) + torch.logsumexp(
        log_posterior, dim=-1
    )
    p_dormant = torch.exp(log_dormant - torch.logaddexp(log_dormant, log_alive))
    return torch.maximum(value, elapsed[rows]), p_dormant[rows]


def sample_amount(
    amount: AmountDistribution, rows: Tensor, event_type: Tensor, noise: Tensor
) -> Tensor:
    """Zero-inflated log-normal amount given the sampled type."""
    loc = amount.loc[rows, event_type]
    scale = torch.exp(amount.log_scale[rows, event_type])
    p_zero = torch.sigmoid(amount.zero_logit[rows, event_type])
    value = torch.exp(loc + scale * _normal(noise[:, AMOUNT]))
    return torch.where(noise[:, ZERO] < p_zero, torch.zeros_like(value), value)


# --------------------------------------------------------------------------- features
class Calendar:
    """Calendar inputs of times given in days after an origin instant (like the featuriser)."""

    def __init__(self, origin: pd.Timestamp, n_days: int, device: torch.device, dates_only: bool):
        first = origin.normalize()
        days = pd.date_range(first, periods=n_days + 2, freq="D")
        self.offset = (origin - first) / pd.Timedelta(days=1)
        self.day_of_week = torch.as_tensor(days.dayofweek.to_numpy(np.int64), device=device)
        self.day_of_month = torch.as_tensor(days.day.to_numpy(np.int64), device=device)
        self.dates_only = dates_only

    def features(self, time: Tensor) -> dict[str, Tensor]:
        """``day_of_week``, ``day_of_month``, ``hour`` of times (float64 days after the origin)."""
        absolute = time + self.offset
        day = torch.floor(absolute)
        index = day.long().clamp(0, len(self.day_of_week) - 1)
        hour = torch.floor((absolute - day) * 24.0).long().clamp(0, 23)
        return {
            "day_of_week": self.day_of_week[index],
            "day_of_month": self.day_of_month[index],
            "hour": torch.zeros_like(hour) if self.dates_only else hour,
        }


def step_inputs(
    calendar: Calendar,
    event_type: Tensor,
    amount: Tensor,
    time: Tensor,
    previous_time: Tensor,
    numeric: Tensor | None,
    categorical: Tensor | None = None,
) -> dict[str, Tensor]:
    """Encoder inputs of one new event per row, as the featuriser would build them: the
    contract's sequence inputs (CONTRACT.md) at one position, in their dtypes."""
    values = {
        "event_type": event_type,
        "amount": amount,
        "delta_t": time - previous_time,
        **calendar.features(time),
        "numeric": numeric,
        "categorical": categorical,
    }
    sizes = {"numeric_features": 0 if numeric is None else numeric.shape[-1],
             "categorical_features": 0 if categorical is None else categorical.shape[-1]}
    return {
        spec.name: values[spec.name].to(getattr(torch, spec.dtype))
        for spec in sequence_inputs(sizes)
    }


def mean_numeric(batch: Mapping[str, Tensor]) -> Tensor | None:
    """``[B, F]`` mean raw numeric features over each row's real events (None without any)."""
    if "numeric" not in batch:
        return None
    length = batch["length"]
    valid = torch.arange(batch["numeric"].shape[1], device=length.device)[None, :] < length[:, None]
    total = (batch["numeric"] * valid[..., None]).sum(dim=1)
    return total / length[:, None].clamp(min=1)


def last_categorical(batch: Mapping[str, Tensor]) -> Tensor | None:
    """``[B, C]`` categorical ids of each row's last real event (None without any)."""
    if "categorical" not in batch:
        return None
    return gather_last(batch["categorical"], batch["length"])


# --------------------------------------------------------------------------- chunks
def chunk_seed(seed: int, chunk: int) -> int:
    """Seed of one chunk's generator, derived from the run seed and the chunk index."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1, np.uint64)[0])


def model_device(model: TwinModule) -> torch.device:
    """Device of the model's parameters."""
    return next(model.parameters()).device


def _dummy_batch(model: TwinModule, length: int) -> dict[str, Tensor]:
    """Model inputs of one customer with ``length`` events (valid random values: only the
    shapes of the state they give matter)."""
    arrays = random_inputs(np.random.default_rng(0), model.contract_sizes(), 1, length, [length])
    return {name: torch.as_tensor(value, device=model_device(model)) for name, value in arrays.items()}


@torch.inference_mode()
def chunk_customers(
    model: TwinModule | Sequence[TwinModule], samples: int, history_len: int, memory_mb: float
) -> int:
    """Customers per chunk so the carried state of all their paths fits in ``memory_mb`` (for
    an ensemble, the smallest over its twins: they simulate the same chunks).

    The state of one path is measured on a dummy history of ``history_len`` events and
    doubled (the transformer cache grows by one slot per step and is copied when it does).
    """
    sizes = []
    for member in as_members(model):
        state = member.encoder.prefix_state(_dummy_batch(member, max(1, history_len)))
        path_bytes = 2 * sum(v.numel() * v.element_size() for v in state.values())
        paths = int(min(MAX_CHUNK_PATHS, max(samples, memory_mb * 2**20 // path_bytes)))
        sizes.append(max(1, paths // samples))
    return min(sizes)


class ChunkSimulator:
    """All paths of one chunk of customers, advanced one event per step.

    Working rows are the paths still running; finished paths are dropped from the encoder
    state (their noise is still drawn, see the module docstring).
    """

    def __init__(
        self,
        model: TwinModule,
        batch: Mapping[str, Tensor],
        elapsed: Tensor,
        forced: dict[str, Tensor],
        n_days: int,
        calendar: Calendar,
        config: RolloutConfig,
        generator: torch.Generator,
    ):
        self.model, self.config, self.generator = model, config, generator
        self.calendar, self.window = calendar, float(n_days)
        self.forced = forced
        self.device = elapsed.device
        n, samples = len(elapsed), config.samples
        self.n_paths = n * samples
        self.prefix = model.encoder.prefix_state(batch)
        self.fill = mean_numeric(batch)
        held = last_categorical(batch)  # per working row: the latest event's values
        self.held = None if held is None else held.repeat_interleave(samples, dim=0)
        self.elapsed = elapsed
        self.path = torch.arange(self.n_paths, device=self.device)
        self.customer = self.path // samples
        self.time = -elapsed[self.customer]
        self.forced_next = torch.zeros(self.n_paths, dtype=torch.int64, device=self.device)
        self.state: dict[str, Tensor] | None = None
        zeros = torch.zeros(self.n_paths, dtype=torch.float64, device=self.device)
        self.count, self.spend, self.transactions = zeros.clone(), zeros.clone(), zeros.clone()
        self.last_day = torch.full((self.n_paths,), -1, dtype=torch.int64, device=self.device)
        self.capped = torch.zeros(self.n_paths, dtype=torch.bool, device=self.device)
        self.daily = torch.zeros(n_days, dtype=torch.float64, device=self.device)
        self.records: list[dict[str, Tensor]] = []
        self.encoder_steps = 0

    def _noise(self) -> Tensor:
        """This step's uniforms for every path of the chunk, rows of the working paths."""
        noise = torch.rand((self.n_paths, N_NOISE), generator=self.generator, device=self.device)
        return noise[self.path]

    def _sample(self, step: int, noise: Tensor) -> dict[str, Tensor]:
        """Next generated event of every working row (``time`` is ``inf`` when dormant).

        The first step reads the heads at each customer's last event (one row per customer).
        Only the next-event heads run (type, gap, amount): churn and horizon are not sampled.
        """
        hidden = self.prefix["hidden"] if step == 0 else self.state["hidden"]
        gap_distribution = self.model.time_head(hidden)
        if step == 0:
            rows = self.customer
            gap, p_dormant = sample_gap_beyond(gap_distribution, self.elapsed, rows, noise)
        else:
            rows = torch.arange(len(self.path), device=self.device)
            gap = sample_gap(gap_distribution, rows, noise)
            p_dormant = gap_distribution.dormant_prob
        cdf = categorical_cdf(self.model.type_head(hidden))[rows]
        event_type = draw_categorical(cdf, noise[:, TYPE])
        dormant = noise[:, DORMANT].double() < p_dormant
        time = torch.where(dormant, torch.full_like(gap, torch.inf), self.time + gap)
        amount = sample_amount(self.model.amount_head(hidden), rows, event_type, noise)
        return {"time": time, "event_type": event_type, "amount": amount}

    def _merge_forced(self, generated: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """The next event of each row: the injected one when it comes first; its flag."""
        slot = self.forced_next[:, None]
        forced_time = self.forced["time"][self.customer].gather(1, slot)[:, 0]
        injected = forced_time <= generated["time"]
        event = {
            "time": torch.where(injected, forced_time, generated["time"]),
            "event_type": torch.where(
                injected,
                self.forced["event_type"][self.customer].gather(1, slot)[:, 0],
                generated["event_type"],
            ),
            "amount": torch.where(
                injected,
                self.forced["amount"][self.customer].gather(1, slot)[:, 0],
                generated["amount"],
            ),
        }
        return event, injected

    def _numeric(self, injected: Tensor) -> Tensor | None:
        if self.fill is None:
            return None
        fill = self.fill[self.customer]
        index = self.forced_next[:, None, None].expand(-1, 1, fill.shape[1])
        forced = self.forced["numeric"][self.customer].gather(1, index)[:, 0]
        forced = torch.where(torch.isnan(forced), fill, forced)
        return torch.where(injected[:, None], forced, fill)

    def _categorical(self, injected: Tensor) -> Tensor | None:
        """Categorical ids of this step's events: the held ones, or an injected event's."""
        if self.held is None:
            return None
        index = self.forced_next[:, None, None].expand(-1, 1, self.held.shape[1])
        forced = self.forced["categorical"][self.customer].gather(1, index)[:, 0]
        forced = torch.where(forced == PAD_ID, self.held, forced)
        return torch.where(injected[:, None], forced, self.held)

    def _record(self, event: dict[str, Tensor], generated: Tensor, live: Tensor) -> None:
        """Add the generated events inside the window to the path outcomes."""
        rows = live & generated
        path, time = self.path[rows], event["time"][rows]
        self.count[path] += 1.0
        self.spend[path] += event["amount"][rows].double()
        day = torch.floor(time).long()
        new_day = day != self.last_day[path]
        self.transactions[path[new_day]] += 1.0
        self.last_day[path] = day
        self.daily.index_add_(
            0, day[new_day], torch.full_like(time[new_day], 1.0 / self.config.samples)
        )
        if self.config.keep_paths:
            self.records.append(
                {
                    "path": self.path[live],
                    "time": event["time"][live],
                    "event_type": event["event_type"][live],
                    "amount": event["amount"][live],
                    "injected": ~generated[live],
                }
            )

    def _advance(self, event: dict[str, Tensor], injected: Tensor, live: Tensor, step: int) -> None:
        """Drop the ended rows and feed the live rows' new event to the encoder."""
        keep = torch.nonzero(live)[:, 0]
        numeric = self._numeric(injected)
        numeric = None if numeric is None else numeric[keep]
        categorical = self._categorical(injected)
        self.held = None if categorical is None else categorical[keep]
        event = {key: value[keep] for key, value in event.items()}
        previous = self.time[keep]
        self.path, self.customer, self.time = self.path[keep], self.customer[keep], event["time"]
        self.forced_next = (self.forced_next + injected.long())[keep]
        if step == 0:  # the prefix state, repeated for every live path of its customer
            state = {key: value[self.customer] for key, value in self.prefix.items()}
        elif len(keep) < len(live):
            state = {key: value[keep] for key, value in self.state.items()}
        else:
            state = self.state
        inputs = step_inputs(
            self.calendar, event["event_type"], event["amount"], event["time"], previous, numeric,
            self.held,
        )
        _, self.state = self.model.encoder.step(inputs, state)
        self.encoder_steps += len(keep)

    def run(self) -> int:
        """Simulate until every path has ended or ``max_steps``; return the steps run."""
        for step in range(self.config.max_steps):
            noise = self._noise()
            event, injected = self._merge_forced(self._sample(step, noise))
            live = event["time"] < self.window
            self._record(event, ~injected, live)
            if not bool(live.any()):
                return step + 1
            if step + 1 == self.config.max_steps:
                self.capped[self.path[live]] = True
                return step + 1
            self._advance(event, injected, live, step)
        return self.config.max_steps

    def paths(self, customers: np.ndarray) -> dict[str, np.ndarray] | None:
        """The kept events as CPU arrays; ``customers`` maps chunk rows to ``SequenceSet`` rows.

        Every step adds a record (possibly empty), so there is at least one.
        """
        if not self.config.keep_paths:
            return None
        columns = {
            key: torch.cat([r[key] for r in self.records]).cpu().numpy() for key in self.records[0]
        }
        local, columns["sample"] = np.divmod(columns.pop("path"), self.config.samples)
        columns["customer"] = customers[local]
        return columns


@contextmanager
def eval_mode(*models: TwinModule) -> Iterator[None]:
    """Run with dropout off, restoring each model's mode afterwards."""
    was_training = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, mode in zip(models, was_training, strict=True):
            model.train(mode)


def as_members(model: TwinModule | Sequence[TwinModule]) -> list[TwinModule]:
    """One twin or the members of an ensemble, as a non-empty list."""
    members = [model] if isinstance(model, TwinModule) else list(model)
    if not members:
        raise FintwinInputError("an ensemble needs at least one twin")
    return members


def window_bounds(
    sequences: SequenceSet, horizon_end: str | pd.Timestamp
) -> tuple[pd.Timestamp, pd.Timestamp]:
    """``[start, end)``: the end of the cut-off day and the end of the ``horizon_end`` day."""
    start, end = sequences.observation_end, observation_end(horizon_end)
    if end <= start:
        raise FintwinInputError(
            f"horizon end {pd.Timestamp(horizon_end).date()} is not after the cut-off "
            f"{(start - pd.Timedelta(days=1)).date()}: nothing to simulate"
        )
    return start, end


@torch.inference_mode()
def iter_chunks(
    model: TwinModule,
    sequences: SequenceSet,
    horizon_end: str | pd.Timestamp,
    config: RolloutConfig,
    forced: ForcedEvents | None = None,
) -> Iterator[ChunkOutcome]:
    """Simulate chunk after chunk of customers (in ``sequences`` order).

    The model must be in eval mode (see ``eval_mode``).
    """
    start, end = window_bounds(sequences, horizon_end)
    device = model_device(model)
    n_days = (end - start).days
    calendar = Calendar(start, n_days, device, config.dates_only)
    elapsed = torch.as_tensor(sequences.days_since_last_event(start), device=device)
    n_categorical = model.contract_sizes()["categorical_features"]
    forced = forced or ForcedEvents.none(len(sequences), model.hparams.n_numeric, n_categorical)
    size = config.chunk_customers or chunk_customers(
        model, config.samples, int(sequences.lengths.max(initial=1)), config.memory_mb
    )
    starts = range(0, len(sequences), size)
    for chunk, first in enumerate(tqdm(starts, disable=not config.progress, desc="rollout")):
        index = np.arange(first, min(first + size, len(sequences)))
        batch = {k: v.to(device) for k, v in sequences.batch(index, with_targets=False).items()}
        generator = torch.Generator(device=device).manual_seed(chunk_seed(config.seed, chunk))
        simulator = ChunkSimulator(
            model,
            batch,
            elapsed[index],
            forced.chunk(index, device),
            n_days,
            calendar,
            config,
            generator,
        )
        steps = simulator.run()
        yield _outcome(simulator, model, index, steps)


def iter_pooled_chunks(
    models: Sequence[TwinModule],
    sequences: SequenceSet,
    horizon_end: str | pd.Timestamp,
    config: RolloutConfig,
    forced: ForcedEvents | None = None,
) -> Iterator[ChunkOutcome]:
    """``iter_chunks`` of every member of an ensemble over the same chunks, member ``i`` with
    rollout seed ``config.seed + i``, their paths pooled (``pool_outcomes``): per customer,
    ``samples`` paths of each twin, the outcomes of the twins' equal-weight mixture. With one
    model this is ``iter_chunks``."""
    history_len = int(sequences.lengths.max(initial=1))
    size = config.chunk_customers or chunk_customers(
        models, config.samples, history_len, config.memory_mb
    )
    streams = [
        iter_chunks(
            model,
            sequences,
            horizon_end,
            replace(
                config,
                seed=config.seed + i,
                chunk_customers=size,
                progress=config.progress and i == 0,
            ),
            forced,
        )
        for i, model in enumerate(models)
    ]
    for outcomes in zip(*streams, strict=True):
        yield pool_outcomes(outcomes)


def pool_outcomes(outcomes: Sequence[ChunkOutcome]) -> ChunkOutcome:
    """The members' outcomes of one chunk as one: paths side by side (member ``i``'s samples
    numbered from ``i * samples``), ``p_alive`` and ``daily`` averaged."""
    if len(outcomes) == 1:
        return outcomes[0]
    first = outcomes[0]
    samples = first.count.shape[1]

    def side_by_side(name: str) -> Tensor:
        return torch.cat([getattr(outcome, name) for outcome in outcomes], dim=1)

    paths = None
    if first.paths is not None:
        paths = {key: np.concatenate([o.paths[key] for o in outcomes]) for key in first.paths}
        paths["sample"] = np.concatenate(
            [o.paths["sample"] + i * samples for i, o in enumerate(outcomes)]
        )
    return ChunkOutcome(
        customers=first.customers,
        count=side_by_side("count"),
        spend=side_by_side("spend"),
        transactions=side_by_side("transactions"),
        capped=side_by_side("capped"),
        p_alive=torch.stack([outcome.p_alive for outcome in outcomes]).mean(dim=0),
        daily=torch.stack([outcome.daily for outcome in outcomes]).mean(dim=0),
        steps=max(outcome.steps for outcome in outcomes),
        encoder_steps=sum(outcome.encoder_steps for outcome in outcomes),
        paths=paths,
    )


def _outcome(
    simulator: ChunkSimulator, model: TwinModule, index: np.ndarray, steps: int
) -> ChunkOutcome:
    shape = (len(index), simulator.config.samples)
    gap = model.time_head(simulator.prefix["hidden"])
    p_alive = 1.0 - gap.dormant_after_silence(simulator.elapsed.float())
    return ChunkOutcome(
        customers=index,
        count=simulator.count.view(shape).cpu(),
        spend=simulator.spend.view(shape).cpu(),
        transactions=simulator.transactions.view(shape).cpu(),
        capped=simulator.capped.view(shape).cpu(),
        p_alive=p_alive.double().cpu(),
        daily=simulator.daily.cpu(),
        steps=steps,
        encoder_steps=simulator.encoder_steps,
        paths=simulator.paths(index),
    )


# --------------------------------------------------------------------------- summaries
def mean_and_se(values: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean over samples (dim 1) and its Monte Carlo standard error (NaN with one sample)."""
    samples = values.shape[1]
    mean = values.mean(dim=1)
    if samples < 2:
        return mean.numpy(), np.full(len(mean), np.nan)
    return mean.numpy(), (values.std(dim=1) / samples**0.5).numpy()


def quantile_name(prefix: str, level: float) -> str:
    """Column name of a quantile, e.g. ``count_q10``."""
    return f"{prefix}_q{100 * level:g}"


def summarise(
    outcome: ChunkOutcome, customer_ids: np.ndarray, quantiles: Sequence[float]
) -> pd.DataFrame:
    """Per-customer summary of one chunk (see ``RolloutResult.summary``)."""
    columns: dict[str, np.ndarray] = {}
    for name, values in (
        ("expected_count", outcome.count),
        ("expected_spend", outcome.spend),
        ("expected_transactions", outcome.transactions),
        ("p_active", (outcome.count > 0).double()),
    ):
        columns[name], columns[f"{name}_se"] = mean_and_se(values)
    columns["p_alive"] = outcome.p_alive.numpy()
    levels = torch.tensor(list(quantiles), dtype=torch.float64)
    for prefix, values in (("count", outcome.count), ("spend", outcome.spend)):
        if len(levels):
            table = torch.quantile(values, levels, dim=1).numpy()
            for level, row in zip(quantiles, table, strict=True):
                columns[quantile_name(prefix, level)] = row
    columns["capped_paths"] = outcome.capped.sum(dim=1).numpy()
    index = pd.Index(customer_ids[outcome.customers], name="customer_id")
    return pd.DataFrame(columns, index=index)


def paths_frame(
    paths: dict[str, np.ndarray], sequences: SequenceSet, vocab: Vocab, start: pd.Timestamp
) -> pd.DataFrame:
    """Sampled events as a table with customer ids, timestamps and type names."""
    offset = np.round(paths["time"] * NS_PER_DAY).astype(np.int64)
    return pd.DataFrame(
        {
            "customer_id": sequences.customer_ids[paths["customer"]],
            "sample": paths["sample"].astype(np.int32),
            "timestamp": pd.to_datetime(start.value + offset),
            "event_type": vocab.labels()[paths["event_type"]].astype(str),
            "amount": paths["amount"].astype(np.float64),
            "injected": paths["injected"],
        }
    )


def rollout(
    model: TwinModule | Sequence[TwinModule],
    sequences: SequenceSet,
    vocab: Vocab,
    horizon_end: str | pd.Timestamp,
    config: RolloutConfig | None = None,
    forced: ForcedEvents | None = None,
) -> RolloutResult:
    """Simulate every customer of ``sequences`` from the cut-off to the end of ``horizon_end``.

    ``sequences`` holds the calibration histories (``FeaturiserSpec.sequences`` up to the cut-off);
    ``vocab`` names the sampled types in the kept paths; ``forced`` injects events into the
    paths (see ``fintwin.twin.whatif``). Runs on the model's device. Several models (an
    ensemble, e.g. seeds of one config, featurising alike) pool their paths: each simulates
    ``config.samples`` per customer (``iter_pooled_chunks``), and the summary is over all.
    """
    models = as_members(model)
    config = config or RolloutConfig()
    start, end = window_bounds(sequences, horizon_end)
    summaries, paths, transactions, spend = [], [], [], []
    daily, n_capped, steps, encoder_steps = None, 0, 0, 0
    with eval_mode(*models):
        for outcome in iter_pooled_chunks(models, sequences, horizon_end, config, forced):
            summaries.append(summarise(outcome, sequences.customer_ids, config.quantiles))
            daily = outcome.daily if daily is None else daily + outcome.daily
            n_capped += int(outcome.capped.sum())
            steps = max(steps, outcome.steps)
            encoder_steps += outcome.encoder_steps
            if outcome.paths is not None:
                paths.append(paths_frame(outcome.paths, sequences, vocab, start))
            if config.keep_outcomes:
                transactions.append(outcome.transactions.numpy().astype(np.int64))
                spend.append(outcome.spend.numpy())
    if n_capped:
        log.warning(
            "%d of %d paths reached max_steps=%d before the horizon end; their counts are "
            "truncated (raise max_steps)",
            n_capped,
            len(sequences) * config.samples * len(models),
            config.max_steps,
        )
    days = pd.date_range(start, periods=len(daily), freq="D", name="day")
    return RolloutResult(
        summary=pd.concat(summaries),
        daily_transactions=pd.Series(daily.numpy(), index=days, name="expected_transactions"),
        start=start,
        end=end,
        samples=config.samples * len(models),
        n_capped=n_capped,
        max_steps_run=steps,
        encoder_steps=encoder_steps,
        paths=pd.concat(paths, ignore_index=True) if config.keep_paths else None,
        path_transactions=np.concatenate(transactions) if config.keep_outcomes else None,
        path_spend=np.concatenate(spend) if config.keep_outcomes else None,
    )
