"""Failures that lose nothing: last.ckpt is the latest state, and a run killed mid-epoch and
resumed from it ends exactly as the uninterrupted run."""

import itertools
import json
import signal

import numpy as np
import pytest
import torch

from fintwin.data.datamodule import CustomerIndex, EpochBatchSampler, ResumableLoader
from fintwin.training import run
from tests.test_train import compose_cfg, tiny_overrides, train_process


def _loader(n: int = 50, batch_size: int = 4, seed: int = 3) -> ResumableLoader:
    lengths = np.arange(n) % 7 + 1
    sampler = EpochBatchSampler(lengths, batch_size, seed, by_length=True, bucket_batches=3)
    return ResumableLoader(CustomerIndex(np.arange(n)), batch_sampler=sampler, collate_fn=list)


def _epoch(loader: ResumableLoader, epoch: int) -> list[list[int]]:
    loader.batch_sampler.set_epoch(epoch)
    return list(loader)


def test_each_epoch_is_a_seeded_shuffle_of_every_customer():
    first, again, second = _epoch(_loader(), 1), _epoch(_loader(), 1), _epoch(_loader(), 2)
    assert first == again and first != second
    for batches in (first, second):
        assert sorted(itertools.chain(*batches)) == list(range(50))
    assert _epoch(_loader(seed=4), 1) != first


def test_loader_resumes_after_the_batches_it_handed_out():
    full = _epoch(_loader(), 1)
    interrupted = _loader()
    interrupted.batch_sampler.set_epoch(1)
    assert list(itertools.islice(interrupted, 5)) == full[:5]
    assert interrupted.state_dict() == {"epoch": 1, "batches_done": 5}

    resumed = _loader()
    resumed.load_state_dict(interrupted.state_dict())
    resumed.batch_sampler.set_epoch(1)  # Lightning sets the epoch again: same epoch, same place
    assert list(itertools.islice(resumed, 3)) == full[5:8]
    again = _loader()  # a second interruption in the same epoch stays aligned
    again.load_state_dict(resumed.state_dict())
    assert resumed.state_dict() == {"epoch": 1, "batches_done": 8}
    assert list(again) == full[8:]
    assert again.state_dict() == {"epoch": 1, "batches_done": len(full)}
    assert _epoch(again, 2) == _epoch(_loader(), 2)  # the next epoch starts at its first batch


@pytest.mark.parametrize("n", [1, 13, 200, 401])
@pytest.mark.parametrize("batch_size", [4, 64])
@pytest.mark.parametrize("replicas", [1, 3])
def test_length_counts_the_batches_each_rank_gets(n, batch_size, replicas):
    samplers = [
        EpochBatchSampler(np.ones(n), batch_size, 0, num_replicas=replicas, rank=rank)
        for rank in range(replicas)
    ]
    batches = [list(sampler) for sampler in samplers]
    assert [len(sampler) for sampler in samplers] == [len(b) for b in batches]
    assert len({len(b) for b in batches}) == 1  # every rank steps as often
    seen = list(itertools.chain(*itertools.chain(*batches)))
    assert len(seen) == len(set(seen))


def _last_checkpoint(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def test_last_checkpoint_is_the_latest_state_when_later_epochs_do_not_improve(tmp_path, events_csv):
    overrides = tiny_overrides(events_csv, "lstm") + [
        "trainer.max_epochs=3",
        "test=false",
        "callbacks.model_checkpoint.mode=max",  # only the first epoch counts as an improvement
    ]
    run(compose_cfg(tmp_path, overrides))
    assert _last_checkpoint(tmp_path)["global_step"] == 3 * 3  # 48 customers in batches of 16
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "epoch_000.ckpt",
        "last.ckpt",
    ]


def test_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, events_csv):
    """SIGKILL after step 7 (a step checkpoint at 5), resume from last.ckpt in the same run
    directory: the same batches, random numbers, weight average, checkpoint selection and
    metrics as a run never interrupted."""
    overrides = tiny_overrides(events_csv, "lstm") + [
        "data.batch_size=4",  # 12 steps an epoch, 24 in all
        "callbacks.step_checkpoint.every_n_train_steps=5",
    ]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run(compose_cfg(whole, overrides))

    result = train_process(
        [
            *overrides,
            f"hydra.run.dir={killed}",
            "+callbacks.killer._target_=tests.helpers.KillAtStep",
            "+callbacks.killer.step=7",
        ],
        tmp_path,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    saved = _last_checkpoint(killed)
    assert (saved["epoch"], saved["global_step"]) == (0, 5)
    assert saved["callbacks"]["ExactResume"]["train_loader"] == {"epoch": 0, "batches_done": 5}
    assert not (killed / "metrics.json").exists()

    last = killed / "checkpoints" / "last.ckpt"
    run(compose_cfg(killed, overrides + [f"ckpt_path={last}"]))
    assert _last_checkpoint(killed)["global_step"] == _last_checkpoint(whole)["global_step"] == 24
    assert (killed / "metrics.json").read_text() == (whole / "metrics.json").read_text()
    assert json.loads((whole / "metrics.json").read_text())["test/loss"] > 0
