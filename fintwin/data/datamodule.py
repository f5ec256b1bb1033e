"""LightningDataModule: events -> validated table -> sequences -> padded batches.

Validation and test customers are held out at random (seeded, ``CustomerSplit``), with their
calibration-period events, so next-event metrics are measured on customers the model never
saw. The holdout period after the cut-off is reserved for forecast evaluation. ``setup`` fits
the ``FeaturiserSpec`` on the training customers' calibration events; the checkpoint carries
it, next to the split (source, cut-off, end of observation, simulator).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from opacus.data_loader import wrap_collate_with_empty
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from fintwin.data.features import (
    FEATURISER_KEY,
    FeaturiserSpec,
    Scaling,
    Vocab,
    customer_groups,
    read_events,
)
from fintwin.data.schema import EventSchema
from fintwin.data.sequences import (
    MAX_FIT_GAPS,
    SequenceSet,
    calibration_events,
    fit_population_gaps,
    loss_terms_per_customer,
    training_extent,
    training_gaps,
)
from fintwin.errors import FintwinInputError
from fintwin.privacy import secret_generator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CustomerSplit:
    """Shares of calibration customers held out for validation and test, drawn with ``seed``."""

    val: float = 0.1
    test: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.val < 1 and 0 <= self.test < 1 and self.val + self.test < 1):
            raise FintwinInputError(
                f"data.split: val={self.val}, test={self.test}; expected fractions in [0, 1) "
                "with val + test < 1"
            )

    def assign(self, n: int) -> dict[str, np.ndarray]:
        """Random, seeded partition of customer indices 0..n-1 into train / val / test."""
        order = np.random.default_rng(self.seed).permutation(n)
        n_val, n_test = int(round(n * self.val)), int(round(n * self.test))
        return {
            "val": np.sort(order[:n_val]),
            "test": np.sort(order[n_val : n_val + n_test]),
            "train": np.sort(order[n_val + n_test :]),
        }


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled training batches that depend only on (seed, epoch, rank), resumable mid-epoch.

    Customers are shuffled, cut into chunks of ``bucket_batches`` batches, (with
    ``by_length``: sorted by length inside each chunk, for less padding), batched, and the
    batches shuffled. With several processes each rank takes every ``num_replicas``-th batch.
    ``skip`` batches of the epoch are left out once (set when a run resumes mid-epoch).
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        seed: int,
        by_length: bool = False,
        bucket_batches: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.by_length, self.bucket_batches = by_length, bucket_batches
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.skip = 0, 0

    @property
    def sampler(self) -> EpochBatchSampler:
        """Itself: Lightning calls ``set_epoch`` on a loader's ``batch_sampler.sampler``."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (Lightning calls this as each epoch starts); a new epoch
        starts at its first batch."""
        if epoch != self.epoch:
            self.epoch, self.skip = epoch, 0

    def _batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed + self.epoch)
        order = rng.permutation(len(self.lengths))
        chunk = self.batch_size * self.bucket_batches
        batches = []
        for lo in range(0, len(order), chunk):
            part = order[lo : lo + chunk]
            if self.by_length:
                part = part[np.argsort(self.lengths[part], kind="stable")]
            batches.extend(np.array_split(part, max(1, -(-len(part) // self.batch_size))))
        rng.shuffle(batches)
        return batches[self.rank : self._usable(len(batches)) : self.num_replicas]

    def _usable(self, n_batches: int) -> int:
        """Batches dealt to the ranks: a multiple of ``num_replicas``, so all ranks step alike."""
        return n_batches - n_batches % self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for batch in self._batches()[skip:]:
            yield batch.tolist()

    def __len__(self) -> int:
        # every full chunk holds exactly bucket_batches batches, so the total is ceil(n / size)
        n_batches = -(-len(self.lengths) // self.batch_size)
        return self._usable(n_batches) // self.num_replicas


class ResumableLoader(DataLoader):
    """Training DataLoader over an ``EpochBatchSampler`` that knows its place in the epoch
    (``state_dict``: the batches handed out, not those its workers prefetched), so that a run
    resumed mid-epoch (``fintwin.training.ExactResume``) goes on with the next batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._place = {"epoch": self.batch_sampler.epoch, "batches_done": 0}

    def __iter__(self) -> Iterator:
        sampler = self.batch_sampler
        self._place = {"epoch": sampler.epoch, "batches_done": sampler.skip}
        for batch in super().__iter__():
            self._place["batches_done"] += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The epoch and the number of its batches handed out so far."""
        return dict(self._place)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue ``state``'s epoch after its ``batches_done`` batches."""
        self._place = dict(state)
        self.batch_sampler.epoch, self.batch_sampler.skip = state["epoch"], state["batches_done"]


class CustomerIndex(torch.utils.data.Dataset):
    """Dataset of customer indices; batches are gathered in one go by the collate function."""

    def __init__(self, index: np.ndarray):
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> int:
        return int(self.index[i])


class EventDataModule(pl.LightningDataModule):
    """Padded batches of customer sequences with a seeded customer-level train/val/test split.

    ``source``: a source name, a file or directory path (``fintwin.data.sources``), or
    ``events``, a table given directly. ``cutoff``: the last calibration day. ``schema``: how
    events are validated. ``split``: the held-out customers. ``seed``: the training batches'
    order. ``poisson_sampling``: training batches are Poisson samples of the training
    customers instead (each in with probability ``sample_rate``, independently, at every step:
    what differentially private training is accounted for; ``fintwin.privacy``), drawn with a
    generator seeded from the operating system. After ``setup``, ``spec`` is the fitted
    ``FeaturiserSpec``.
    """

    def __init__(
        self,
        source: str = "cdnow",
        cutoff: str = "1997-09-30",
        horizon_days: float = 90.0,
        max_len: int = 200,
        same_day_merge: bool = False,
        schema: EventSchema | None = None,
        split: CustomerSplit | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        bucket_by_length: bool = False,
        seed: int = 0,
        simulator: object | None = None,
        events: pd.DataFrame | None = None,
        poisson_sampling: bool = False,
    ):
        super().__init__()
        if horizon_days <= 0:
            raise FintwinInputError(
                f"data.horizon_days={horizon_days}: expected a positive number of days"
            )
        if max_len < 1:
            raise FintwinInputError(f"data.max_len={max_len}: expected a positive integer")
        if batch_size < 1:
            raise FintwinInputError(f"data.batch_size={batch_size}: expected a positive integer")
        self.source, self.cutoff = source, str(cutoff)
        self.horizon_days, self.max_len = float(horizon_days), int(max_len)
        self.same_day_merge, self.simulator, self._given_events = same_day_merge, simulator, events
        self.schema = schema or EventSchema()
        self.split = split or CustomerSplit()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.bucket_by_length, self.seed = bucket_by_length, seed
        self.poisson_sampling = poisson_sampling
        self.events: pd.DataFrame | None = None
        self.sequences: SequenceSet | None = None
        self.spec: FeaturiserSpec | None = None
        self.model_statistics: dict[str, float] = {}
        self.splits: dict[str, np.ndarray] = {}

    def load(self) -> pd.DataFrame:
        """The validated event table (all periods)."""
        return read_events(
            self._given_events if self._given_events is not None else self.source,
            self.schema,
            same_day_merge=self.same_day_merge,
            simulator_config=self.simulator,
        )

    def _fit_vocabularies(self, calib: pd.DataFrame, is_train: np.ndarray) -> FeaturiserSpec:
        """The spec with its vocabularies fitted on the training customers' ``calib`` events
        (``is_train``: per event), before scaling."""
        train = calib[is_train]
        names = tuple(self.schema.categorical_features)
        return FeaturiserSpec(
            vocab=Vocab.fit(train["event_type"].to_numpy()),
            max_len=self.max_len,
            horizon_days=self.horizon_days,
            same_day_merge=self.same_day_merge,
            numeric_features=tuple(self.schema.numeric_features),
            categorical_features=names,
            categorical_vocabs=tuple(Vocab.fit(train[name].to_numpy()) for name in names),
            allow_negative_amount=self.schema.allow_negative_amount,
            drop_duplicates=self.schema.drop_duplicates,
            day_first=self.schema.day_first,
            decimal=self.schema.decimal,
        )

    def setup(self, stage: str | None = None) -> None:
        """Load, split customers, fit the featuriser spec (vocabularies and scaling) and the
        model statistics on training customers' calibration events."""
        if self.sequences is not None:
            return
        self.events = self.load()
        calib = calibration_events(self.events, self.cutoff)
        if calib.empty:
            raise FintwinInputError(
                f"{self.source}: no events on or before data.cutoff={self.cutoff} "
                f"(data spans {self.events['timestamp'].min()} to {self.events['timestamp'].max()})"
            )
        _, counts = customer_groups(calib["customer_id"].to_numpy())
        self.splits = self.split.assign(len(counts))
        is_train = np.zeros(len(counts), dtype=bool)
        is_train[self.splits["train"]] = True
        spec = self._fit_vocabularies(calib, np.repeat(is_train, counts))
        self.sequences = spec.sequences(self.events, self.cutoff)
        train_events = np.repeat(is_train, self.sequences.lengths)
        features = {k: v[train_events] for k, v in self.sequences.features.items()}
        self.spec = dataclasses.replace(spec, scaling=Scaling.fit(features))
        train = self.splits["train"]
        gaps = training_gaps(self.sequences, train, MAX_FIT_GAPS, self.seed)
        self.model_statistics = {
            **loss_terms_per_customer(self.sequences, train),
            **training_extent(self.sequences, train, self.horizon_days),
            "dormancy_init": fit_population_gaps(*gaps)[2],
        }
        log.info(
            "%s: %d customers (%d train / %d val / %d test), %d calibration events, vocab %d",
            self.source,
            len(counts),
            len(self.splits["train"]),
            len(self.splits["val"]),
            len(self.splits["test"]),
            self.sequences.n_events,
            self.spec.vocab.size,
        )

    @property
    def model_scaling(self) -> dict:
        """The model's ``scaling`` hyper-parameter: the spec's input scaling plus the model
        statistics (loss normalisers, training extent, dormancy share) of training customers."""
        return self.spec.scaling.to_dict() | self.model_statistics

    def state_dict(self) -> dict:
        """What a checkpoint carries to featurise new data exactly as in training (the spec)
        and to know the data it was trained on (source, cut-off, simulator)."""
        if self.spec is None:
            return {}
        return {
            FEATURISER_KEY: self.spec.to_dict(),
            "source": self.source,
            "cutoff": self.cutoff,
            "observation_end": self.sequences.observation_end.isoformat(),
            "simulator": dataclasses.asdict(self.simulator) if self.simulator is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resuming keeps the run's own spec (refitted identically in setup)."""

    def collate(self, index: list[int]) -> dict[str, torch.Tensor]:
        """Gather a padded batch for the given customer indices."""
        return self.sequences.batch(np.asarray(index))

    @property
    def sample_rate(self) -> float:
        """Probability of each training customer to be in a Poisson batch: ``batch_size``
        customers per batch on average (all of them when there are fewer)."""
        return min(1.0, self.batch_size / len(self.splits["train"]))

    def _poisson_loader(self, index: np.ndarray, world: int) -> DataLoader:
        """Training batches of ``poisson_sampling`` (``1 / sample_rate`` per epoch); an empty
        draw is a batch of no customers (Opacus' ``wrap_collate_with_empty``)."""
        if world > 1:
            raise FintwinInputError(
                "data.poisson_sampling: expected one process (trainer.devices=1)"
            )
        sampler = UniformWithReplacementSampler(
            num_samples=len(index), sample_rate=self.sample_rate, generator=secret_generator()
        )
        return DataLoader(
            CustomerIndex(index),
            batch_sampler=sampler,
            collate_fn=wrap_collate_with_empty(collate_fn=self.collate),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _loader(self, split: str, train: bool) -> DataLoader:
        """Seeded, resumable shuffled batches for training; otherwise customers in order of
        length (little padding; every evaluation metric is a sum over events, so batching
        does not change it); rank-aware.

        The samplers shard by rank themselves, so DDP runs set
        ``trainer.use_distributed_sampler=false``.
        """
        index = self.splits[split]
        if not train:
            index = index[np.argsort(self.sequences.lengths[index], kind="stable")]
        world, rank = (
            (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        )
        common = dict(
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
        if train and self.poisson_sampling:
            return self._poisson_loader(index, world)
        if train:
            sampler = EpochBatchSampler(
                self.sequences.lengths[index],
                self.batch_size,
                self.seed,
                by_length=self.bucket_by_length,
                num_replicas=world,
                rank=rank,
            )
            return ResumableLoader(
                CustomerIndex(index),
                batch_sampler=sampler,
                generator=torch.Generator().manual_seed(self.seed),  # not the global RNG
                **common,
            )
        if world > 1:
            shard = DistributedSampler(
                CustomerIndex(index), num_replicas=world, rank=rank, shuffle=False
            )
            return DataLoader(
                CustomerIndex(index), batch_size=self.batch_size, sampler=shard, **common
            )
        return DataLoader(CustomerIndex(index), batch_size=self.batch_size, **common)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
