"""Causal sequence encoders: ``(B, T)`` event features -> ``(B, T, H)`` hidden states.

Both encoders share one interface:

- ``forward(batch) -> Tensor[B, T, H]``: hidden state after each event; position ``t``
  depends only on events ``<= t`` (right padding never leaks into real positions).
- ``prefix_state(batch) -> state``: the carried state after each row's last real event
  (``length - 1``), including ``state["hidden"]`` (``[B, H]``, the hidden state there).
- ``step(event, state) -> (hidden[B, H], new_state)``: feed one more event per row
  (``event`` is a dict of ``[B]`` tensors, ``numeric`` ``[B, F]``, ``categorical`` ``[B, C]``)
  without re-encoding the history.
- ``expand_state(state, n)``: repeat every row ``n`` times (row ``i`` -> rows
  ``i*n .. i*n+n-1``), for many Monte Carlo samples per customer.

A state is a ``dict[str, Tensor]`` whose tensors all have the batch on dim 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

State = dict[str, Tensor]

SCALING_KEYS = ("amount_mean", "amount_std", "delta_t_mean", "delta_t_std")
MIN_STD = 1e-6


def sequence_mask(length: Tensor, max_len: int) -> Tensor:
    """``[B, T]`` bool mask, True at real positions ``t < length``."""
    positions = torch.arange(max_len, device=length.device)
    return positions.unsqueeze(0) < length.unsqueeze(1)


def gather_last(values: Tensor, length: Tensor) -> Tensor:
    """Values at each row's last real position: ``[B, T, ...] -> [B, ...]``."""
    index = (length - 1).clamp(min=0).view(-1, 1, *([1] * (values.dim() - 2)))
    index = index.expand(-1, 1, *values.shape[2:])
    return values.gather(1, index).squeeze(1)


def expand_state(state: State, n: int) -> State:
    """Repeat each row of a state ``n`` times along the batch (``repeat_interleave``)."""
    return {key: value.repeat_interleave(n, dim=0) for key, value in state.items()}


def event_as_batch(event: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A one-event step (``[B]`` tensors, ``numeric`` ``[B, F]``, ``categorical`` ``[B, C]``)
    as a ``T = 1`` batch."""
    return {key: value.unsqueeze(1) for key, value in event.items()}


def _check_scaling(scaling: Mapping[str, object], n_numeric: int) -> None:
    missing = [key for key in SCALING_KEYS if key not in scaling]
    if missing:
        raise KeyError(f"scaling statistics are missing {missing}; expected keys {SCALING_KEYS}")
    if n_numeric > 0:
        for key in ("numeric_mean", "numeric_std"):
            values = scaling.get(key)
            if not isinstance(values, Sequence) or len(values) != n_numeric:
                raise ValueError(
                    f"scaling[{key!r}] must be a list of {n_numeric} floats (one per numeric "
                    f"feature), got {values!r}"
                )


class EventEmbedding(nn.Module):
    """Embeds raw event features into ``dim``-sized vectors.

    Sums: event-type embedding (``padding_idx=0``); calendar embeddings (day of week,
    day of month, hour); one embedding per categorical feature (``categorical_sizes``, ids
    ``batch["categorical"][..., c]``, ``padding_idx=0``); a linear map of the standardised
    continuous values ``[log1p(amount), log1p(delta_t), numeric extras]``. The scaling
    statistics are buffers, so the module (and the exported graph) takes raw values.

    Categorical features are summed like the event type and the calendar, not concatenated
    and projected: a projection of concatenated embeddings is itself a sum of per-feature
    linear maps, so at the model's width the sum loses nothing and adds no layer, and a
    model without categorical features keeps its parameters (and numbers) unchanged.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        scaling: Mapping[str, object],
        n_numeric: int = 0,
        dropout: float = 0.0,
        categorical_sizes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        _check_scaling(scaling, n_numeric)
        self.n_numeric = n_numeric
        self.type_embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.day_of_week_embedding = nn.Embedding(7, dim)
        self.day_of_month_embedding = nn.Embedding(32, dim)
        self.hour_embedding = nn.Embedding(24, dim)
        self.value_projection = nn.Linear(2 + n_numeric, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.categorical_embeddings = nn.ModuleList(
            nn.Embedding(size, dim, padding_idx=0) for size in _checked_sizes(categorical_sizes)
        )
        log_mean = [float(scaling["amount_mean"]), float(scaling["delta_t_mean"])]
        log_std = [float(scaling["amount_std"]), float(scaling["delta_t_std"])]
        self.register_buffer("log_mean", torch.tensor(log_mean))
        self.register_buffer("log_std", torch.tensor(log_std).clamp(min=MIN_STD))
        numeric_mean = [float(x) for x in scaling.get("numeric_mean", [])][:n_numeric]
        numeric_std = [float(x) for x in scaling.get("numeric_std", [])][:n_numeric]
        self.register_buffer("numeric_mean", torch.tensor(numeric_mean, dtype=torch.float32))
        self.register_buffer(
            "numeric_std", torch.tensor(numeric_std, dtype=torch.float32).clamp(min=MIN_STD)
        )

    def scaled_values(self, batch: Mapping[str, Tensor]) -> Tensor:
        """``[B, T, 2 + F]`` standardised ``log1p(amount)``, ``log1p(delta_t)``, numeric."""
        raw = torch.stack([batch["amount"], batch["delta_t"]], dim=-1).float()
        values = (torch.log1p(raw.clamp(min=0.0)) - self.log_mean) / self.log_std
        if self.n_numeric == 0:
            return values
        numeric = (batch["numeric"].float() - self.numeric_mean) / self.numeric_std
        return torch.cat([values, numeric], dim=-1)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """``[B, T, dim]`` event embeddings."""
        x = (
            self.type_embedding(batch["event_type"])
            + self.day_of_week_embedding(batch["day_of_week"].clamp(0, 6))
            + self.day_of_month_embedding(batch["day_of_month"].clamp(0, 31))
            + self.hour_embedding(batch["hour"].clamp(0, 23))
            + self.value_projection(self.scaled_values(batch))
        )
        for field, embedding in enumerate(self.categorical_embeddings):
            x = x + embedding(batch["categorical"][..., field])
        return self.dropout(self.norm(x))


def _checked_sizes(categorical_sizes: Sequence[int]) -> list[int]:
    """Vocabulary sizes of the categorical features; each holds padding and OOV (>= 2)."""
    sizes = [int(size) for size in categorical_sizes]
    if any(size < 2 for size in sizes):
        raise ValueError(
            f"categorical_sizes {sizes}: every size counts padding (0) and the unknown value "
            "(1), so it must be >= 2"
        )
    return sizes


RECENCY_CAP_DAYS = 3650.0
RECENCY_LINEAR_DAYS = 60.0
SCAN_STEPS = 16  # exported running maximum: over up to 2**16 events


def causal_running_max(values: Tensor) -> Tensor:
    """Running maximum along dim 1 (``out[:, t] = max(values[:, :t + 1])``).

    ``torch.cummax`` in eager mode; `doubling_running_max` while exporting, since
    ``torch.cummax`` does not export to ONNX.
    """
    if torch.compiler.is_exporting():
        return doubling_running_max(values)
    return torch.cummax(values, dim=1).values


def doubling_running_max(values: Tensor) -> Tensor:
    """`causal_running_max` as ``SCAN_STEPS`` shift-and-max doublings on ``[B, T, ...]``.

    Each shift is a gather of earlier positions (``-inf`` before the start), so every
    intermediate keeps the input's shape and the sequence axis stays dynamic in ONNX.
    """
    positions = torch.arange(values.shape[1], device=values.device)
    view = (1, -1) + (1,) * (values.dim() - 2)
    out = values
    for k in range(SCAN_STEPS):
        source = positions - 2**k
        shifted = out.index_select(1, source.clamp(min=0))
        earlier = torch.where((source >= 0).view(view), shifted, -math.inf)
        out = torch.maximum(out, earlier)
    return out


class TypeRecency(nn.Module):
    """Days since the last event of each type, as features added to the event embedding.

    For each position and each event type ``k``: ``since_k`` = days from the latest type-``k``
    event at or before this position (0 when this event is of type ``k``; the cap when there
    is none in the sequence). Features per type: ``log1p(since_k) / log1p(cap)`` and
    ``min(since_k, 60) / 60`` (day-level resolution for monthly rhythms such as salaries),
    projected to ``dim``. Computed from ``event_type`` and ``delta_t`` alone, so the model's
    inputs do not change. State for stepping: ``since`` ``[B, V]`` (float64).
    """

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.projection = nn.Linear(2 * vocab_size, dim)

    def running(self, batch: Mapping[str, Tensor]) -> Tensor:
        """``[B, T, V]`` float64 days since the last event of each type (capped)."""
        elapsed = elapsed_days(batch)
        is_type = F.one_hot(batch["event_type"], self.vocab_size).bool()
        stamped = torch.where(is_type, elapsed.unsqueeze(-1), -math.inf)
        since = elapsed.unsqueeze(-1) - causal_running_max(stamped)
        return since.clamp(max=RECENCY_CAP_DAYS)

    def features(self, since: Tensor) -> Tensor:
        """``[..., dim]`` projected features of ``since`` ``[..., V]``."""
        logarithmic = torch.log1p(since) / math.log1p(RECENCY_CAP_DAYS)
        linear = since.clamp(max=RECENCY_LINEAR_DAYS) / RECENCY_LINEAR_DAYS
        return self.projection(torch.cat([logarithmic, linear], dim=-1).float())

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """``[B, T, dim]`` features of a full sequence batch."""
        return self.features(self.running(batch))

    def step(self, event: Mapping[str, Tensor], since: Tensor) -> tuple[Tensor, Tensor]:
        """Features ``[B, 1, dim]`` after one more event per row, and the new ``since``."""
        is_type = F.one_hot(event["event_type"], self.vocab_size).bool()
        advanced = since + event["delta_t"].double().clamp(min=0.0).unsqueeze(-1)
        since = torch.where(is_type, 0.0, advanced).clamp(max=RECENCY_CAP_DAYS)
        return self.features(since).unsqueeze(1), since


class HistorySummary(nn.Module):
    """Running statistics of the history so far, as features added to the event embedding.

    At each position, over the events up to it: ``log1p`` of the number of events, of the
    days since the first event and of the number of gaps per 30 days (the customer's rate,
    as BG/NBD's frequency / age), and the mean ``log1p(gap)`` and ``log1p(amount)``
    (standardised with the featuriser's statistics), projected to ``dim``. The count and the
    age are clamped to the longest training history (``scaling["history_max_events"]``,
    ``["history_max_days"]``; unclamped when absent), so simulated futures that outgrow it
    stay inside the range the model was fitted on; the rate and means use the full sums.
    Computed from ``delta_t`` and ``amount`` alone, so the model's inputs do not change.
    State for stepping: ``summary`` ``[B, 5]`` float64 running sums (events, gaps, days,
    ``log1p(gap)``, ``log1p(amount)``).
    """

    N_FEATURES = 5

    def __init__(self, dim: int, scaling: Mapping[str, object]) -> None:
        super().__init__()
        self.projection = nn.Linear(self.N_FEATURES, dim)
        mean = [float(scaling["delta_t_mean"]), float(scaling["amount_mean"])]
        std = [float(scaling["delta_t_std"]), float(scaling["amount_std"])]
        self.register_buffer("log_mean", torch.tensor(mean, dtype=torch.float64))
        self.register_buffer("log_std", torch.tensor(std, dtype=torch.float64).clamp(min=MIN_STD))
        extent = [float(scaling.get(f"history_max_{key}", math.inf)) for key in ("events", "days")]
        self.register_buffer(  # from the hyper-parameters, so older checkpoints still load
            "max_extent", torch.tensor(extent, dtype=torch.float64), persistent=False
        )

    @staticmethod
    def increments(batch: Mapping[str, Tensor]) -> Tensor:
        """``[B, T, 5]`` float64 per-event contributions to the running sums."""
        gap = batch["delta_t"].double().clamp(min=0.0)
        amount = batch["amount"].double().clamp(min=0.0)
        return torch.stack(
            [torch.ones_like(gap), (gap > 0).double(), gap, torch.log1p(gap), torch.log1p(amount)],
            dim=-1,
        )

    def running(self, batch: Mapping[str, Tensor]) -> Tensor:
        """``[B, T, 5]`` running sums at every position (a causal cumulative sum)."""
        return torch.cumsum(self.increments(batch), dim=1)

    def features(self, sums: Tensor) -> Tensor:
        """``[..., dim]`` projected features of running ``sums`` ``[..., 5]``."""
        events, gaps, days, log_gap, log_amount = sums.unbind(-1)
        means = torch.stack([log_gap / gaps.clamp(min=1.0), log_amount / events], dim=-1)
        rate = 30.0 * gaps / days.clamp(min=1.0)
        extent = torch.minimum(torch.stack([events, days], dim=-1), self.max_extent)
        features = torch.cat(
            [
                torch.log1p(extent),
                torch.log1p(rate).unsqueeze(-1),
                (means - self.log_mean) / self.log_std,
            ],
            dim=-1,
        )
        return self.projection(features.float())

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """``[B, T, dim]`` features of a full sequence batch."""
        return self.features(self.running(batch))

    def step(self, event: Mapping[str, Tensor], sums: Tensor) -> tuple[Tensor, Tensor]:
        """Features ``[B, 1, dim]`` after one more event per row, and the new sums."""
        sums = sums + self.increments(event_as_batch(event))[:, 0]
        return self.features(sums).unsqueeze(1), sums


class EventInput(nn.Module):
    """Shared input of both encoders: ``EventEmbedding`` plus the optional running features
    ``TypeRecency`` (state ``since``) and ``HistorySummary`` (state ``summary``).

    A running-feature module has ``running(batch)`` (its ``[B, T, ...]`` state at every
    position), ``features(state)``, ``forward(batch)`` and ``step(event, state)``.
    Subclasses set ``self.embedding``, ``self.recency`` and ``self.summary`` (``None`` when
    off).
    """

    embedding: EventEmbedding
    recency: TypeRecency | None
    summary: HistorySummary | None

    def running_inputs(self) -> dict[str, TypeRecency | HistorySummary]:
        """The running-feature modules that are on, by the name of their state."""
        modules = {"since": self.recency, "summary": self.summary}
        return {key: module for key, module in modules.items() if module is not None}

    def embed(self, batch: Mapping[str, Tensor]) -> Tensor:
        """``[B, T, H]`` inputs of a full sequence batch."""
        x = self.embedding(batch)
        for module in self.running_inputs().values():
            x = x + module(batch)
        return x

    def embed_step(self, event: Mapping[str, Tensor], state: State) -> tuple[Tensor, State]:
        """``[B, 1, H]`` input of one more event per row and the updated input state."""
        x = self.embedding(event_as_batch(event))
        input_state: State = {}
        for key, module in self.running_inputs().items():
            features, input_state[key] = module.step(event, state[key])
            x = x + features
        return x, input_state

    def input_state(self, batch: Mapping[str, Tensor]) -> State:
        """Running-feature states after each row's last real event."""
        return {
            key: gather_last(module.running(batch), batch["length"])
            for key, module in self.running_inputs().items()
        }


class LSTMEncoder(EventInput):
    """Event embedding followed by a multi-layer unidirectional LSTM.

    The hidden state is the LSTM output plus the event's own embedding (a skip connection:
    the heads see the current event directly, the LSTM carries the history).
    ``type_recency`` and ``history_summary`` add ``TypeRecency`` and ``HistorySummary``
    features to the input; ``categorical_sizes`` embeds categorical features (``EventEmbedding``).
    State: ``h``, ``c`` ``[B, num_layers, H]``, ``hidden`` ``[B, H]`` (and ``since``,
    ``summary``).
    """

    def __init__(
        self,
        vocab_size: int,
        scaling: Mapping[str, object],
        n_numeric: int = 0,
        hidden_size: int = 128,
        num_layers: int = 2,
        dropout: float = 0.1,
        type_recency: bool = False,
        history_summary: bool = False,
        categorical_sizes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.embedding = EventEmbedding(
            vocab_size, hidden_size, scaling, n_numeric, dropout, categorical_sizes
        )
        self.recency = TypeRecency(vocab_size, hidden_size) if type_recency else None
        self.summary = HistorySummary(hidden_size, scaling) if history_summary else None
        self.lstm = nn.LSTM(
            hidden_size,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """``[B, T, H]`` hidden states."""
        x = self.embed(batch)
        output, _ = self.lstm(x)
        return output + x

    def prefix_state(self, batch: Mapping[str, Tensor]) -> State:
        """LSTM ``(h, c)`` after each row's last real event (packed, so padding is skipped)."""
        x = self.embed(batch)
        packed = nn.utils.rnn.pack_padded_sequence(
            x, batch["length"].cpu(), batch_first=True, enforce_sorted=False
        )
        _, (h, c) = self.lstm(packed)
        hidden = h[-1] + gather_last(x, batch["length"])
        state = {"h": h.transpose(0, 1), "c": c.transpose(0, 1), "hidden": hidden}
        return state | self.input_state(batch)

    def step(self, event: Mapping[str, Tensor], state: State) -> tuple[Tensor, State]:
        """Feed one event per row; O(1) in the history length."""
        carried = (state["h"].transpose(0, 1).contiguous(), state["c"].transpose(0, 1).contiguous())
        x, input_state = self.embed_step(event, state)
        output, (h, c) = self.lstm(x, carried)
        hidden = (output + x)[:, 0]
        new_state = {"h": h.transpose(0, 1), "c": c.transpose(0, 1), "hidden": hidden}
        return hidden, new_state | input_state

    def expand_state(self, state: State, n: int) -> State:
        """Repeat each row ``n`` times."""
        return expand_state(state, n)


def sinusoidal_features(values: Tensor, dim: int, max_period: float) -> Tensor:
    """``[..., dim]`` sin/cos features of ``values`` with periods from 2*pi up to ``max_period``."""
    half = dim // 2
    exponent = torch.arange(half, device=values.device, dtype=torch.float32) / half
    frequencies = torch.exp(-math.log(max_period) * exponent)
    angles = values.float().unsqueeze(-1) * frequencies
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def elapsed_days(batch: Mapping[str, Tensor]) -> Tensor:
    """``[B, T]`` float64 days since the sequence's first event (cumulative ``delta_t``).

    Accumulated in float64 so that stepping (``elapsed + delta_t``) and the full pass agree
    to the last float32 bit.
    """
    return torch.cumsum(batch["delta_t"].double().clamp(min=0.0), dim=1)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention via ``F.scaled_dot_product_attention``.

    ``forward`` is causal over the whole sequence and also returns keys/values ``[B, nh, T,
    hd]`` for a cache; ``attend_cached`` attends one new query to a cache plus itself.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden_size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, T, dim] -> 3 x [B, nh, T, hd]``."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _merge(self, y: Tensor) -> Tensor:
        """``[B, nh, T, hd] -> [B, T, dim]`` through the output projection."""
        return self.out(y.transpose(1, 2).flatten(2))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self._split(x)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        return self._merge(y), k, v

    def attend_cached(
        self, x: Tensor, k_cache: Tensor, v_cache: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One new position ``x`` ``[B, 1, dim]`` attending to valid cache slots and itself.

        Returns the output and the cache with the new key/value appended (slot ``S``).
        """
        q, k, v = self._split(x)
        k_all = torch.cat([k_cache, k], dim=2)
        v_all = torch.cat([v_cache, v], dim=2)
        mask = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1)[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return self._merge(y), k_all, v_all


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, num_heads: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads, dropout)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, ff_mult * dim),
            nn.GELU(),
            nn.Linear(ff_mult * dim, dim),
            nn.Dropout(dropout),
        )
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        y, k, v = self.attn(self.attn_norm(x))
        x = x + self.resid_dropout(y)
        return x + self.mlp(self.mlp_norm(x)), k, v

    def step(
        self, x: Tensor, k_cache: Tensor, v_cache: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, k, v = self.attn.attend_cached(self.attn_norm(x), k_cache, v_cache, valid)
        x = x + self.resid_dropout(y)
        return x + self.mlp(self.mlp_norm(x)), k, v


class TransformerEncoder(EventInput):
    """Causal pre-norm transformer over event embeddings.

    Input = event embedding + sinusoidal position (index of the event in the sequence) +
    a learned projection of sinusoidal features of elapsed time (days since the first event
    of the sequence, the cumulative sum of ``delta_t``); ``log1p(delta_t)`` itself is in the
    event embedding. ``type_recency`` and ``history_summary`` add ``TypeRecency`` and
    ``HistorySummary`` features to the input; ``categorical_sizes`` embeds categorical
    features (``EventEmbedding``).

    State: ``k``, ``v`` ``[B, num_layers, nh, S, hd]`` key/value cache; ``valid`` ``[B, S]``
    (cache slots that hold real events: slots past a row's length in the prefix are
    padding and masked); ``position`` ``[B]`` (index of the next event); ``elapsed`` ``[B]``
    (float64 elapsed days at the last event); ``hidden`` ``[B, H]`` (and ``since``,
    ``summary``).
    """

    def __init__(
        self,
        vocab_size: int,
        scaling: Mapping[str, object],
        n_numeric: int = 0,
        hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        ff_mult: int = 4,
        dropout: float = 0.1,
        time_features: int = 32,
        max_period_days: float = 10000.0,
        type_recency: bool = False,
        history_summary: bool = False,
        categorical_sizes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if hidden_size % 2 or time_features % 2:
            raise ValueError(
                f"hidden_size ({hidden_size}) and time_features ({time_features}) must be even "
                "(sin/cos pairs)"
            )
        self.hidden_size = hidden_size
        self.time_features = time_features
        self.max_period_days = max_period_days
        self.embedding = EventEmbedding(
            vocab_size, hidden_size, scaling, n_numeric, dropout, categorical_sizes
        )
        self.recency = TypeRecency(vocab_size, hidden_size) if type_recency else None
        self.summary = HistorySummary(hidden_size, scaling) if history_summary else None
        self.time_projection = nn.Linear(time_features, hidden_size)
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, num_heads, ff_mult, dropout) for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(hidden_size)

    def _input(self, x: Tensor, position: Tensor, elapsed: Tensor) -> Tensor:
        """Event input ``x`` plus positional and elapsed-time encodings, ``[B, T, H]``."""
        position_code = sinusoidal_features(position, self.hidden_size, 10000.0)
        time_code = sinusoidal_features(elapsed, self.time_features, self.max_period_days)
        return x + position_code + self.time_projection(time_code)

    def _encode(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        event_type = batch["event_type"]
        position = torch.arange(event_type.shape[1], device=event_type.device)
        position = position.unsqueeze(0).expand_as(event_type)
        x = self._input(self.embed(batch), position, elapsed_days(batch))
        keys, values = [], []
        for block in self.blocks:
            x, k, v = block(x)
            keys.append(k)
            values.append(v)
        return self.final_norm(x), keys, values

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """``[B, T, H]`` hidden states."""
        return self._encode(batch)[0]

    def prefix_state(self, batch: Mapping[str, Tensor]) -> State:
        """Key/value cache of the whole (padded) batch, with slots past each length masked."""
        hidden, keys, values = self._encode(batch)
        length = batch["length"]
        return {
            "k": torch.stack(keys, dim=1),
            "v": torch.stack(values, dim=1),
            "valid": sequence_mask(length, hidden.shape[1]),
            "position": length.clone(),
            "elapsed": gather_last(elapsed_days(batch), length),
            "hidden": gather_last(hidden, length),
        } | self.input_state(batch)

    def step(self, event: Mapping[str, Tensor], state: State) -> tuple[Tensor, State]:
        """Feed one event per row; attention over the cache only (no re-encoding)."""
        elapsed = state["elapsed"] + event["delta_t"].double().clamp(min=0.0)
        x, input_state = self.embed_step(event, state)
        x = self._input(x, state["position"][:, None], elapsed[:, None])
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block.step(x, state["k"][:, i], state["v"][:, i], state["valid"])
            keys.append(k)
            values.append(v)
        hidden = self.final_norm(x)[:, 0]
        valid = state["valid"]
        new_state = {
            "k": torch.stack(keys, dim=1),
            "v": torch.stack(values, dim=1),
            "valid": torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1),
            "position": state["position"] + 1,
            "elapsed": elapsed,
            "hidden": hidden,
        } | input_state
        return hidden, new_state

    def expand_state(self, state: State, n: int) -> State:
        """Repeat each row ``n`` times."""
        return expand_state(state, n)


ENCODERS: dict[str, type[nn.Module]] = {"lstm": LSTMEncoder, "transformer": TransformerEncoder}


def build_encoder(
    name: str,
    vocab_size: int,
    scaling: Mapping[str, object],
    n_numeric: int = 0,
    categorical_sizes: Sequence[int] = (),
    **kwargs: object,
) -> nn.Module:
    """Build an encoder by name (``lstm`` | ``transformer``) with architecture ``kwargs``;
    ``categorical_sizes``: the vocabulary size of each categorical feature."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}")
    return ENCODERS[name](
        vocab_size=vocab_size, scaling=scaling, n_numeric=n_numeric,
        categorical_sizes=categorical_sizes, **kwargs,
    )
