"""Hydra callback that summarises a sweep: best parameters and a table of every trial."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fintwin.files import atomic_path, write_atomic

log = logging.getLogger(__name__)


def collect_trials(sweep_dir: Path, metric: str) -> pd.DataFrame:
    """One row per finished job of a sweep: its overrides and its metrics.json values."""
    rows = []
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        row: dict[str, Any] = {"trial": int(job.name)}
        row.update(dict(o.split("=", 1) for o in overrides if "=" in o))
        metrics_file = job / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        row[metric] = metrics.get(metric)
        row.update({k: v for k, v in metrics.items() if k.startswith("test/") and k != metric})
        rows.append(row)
    return pd.DataFrame(rows)


class SweepSummary(Callback):
    """Writes ``trials.csv`` and ``sweep_summary.md`` into the sweep directory at the end."""

    def __init__(self, metric: str = "val/loss", direction: str = "minimize") -> None:
        self.metric, self.ascending = metric, direction == "minimize"

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        trials = collect_trials(sweep_dir, self.metric)
        if trials.empty:
            log.warning("sweep %s: no finished trials to summarise", sweep_dir)
            return
        trials = trials.sort_values(self.metric, ascending=self.ascending, na_position="last")
        with atomic_path(sweep_dir / "trials.csv") as tmp:
            trials.to_csv(tmp, index=False)
        best = trials.iloc[0]
        params = {k: v for k, v in best.items() if k != "trial" and "/" not in k}
        lines = [
            f"# Sweep summary ({len(trials)} trials)",
            "",
            f"Best trial {best['trial']}: {self.metric} = {best[self.metric]}",
            "",
            "Best parameters:",
            "",
            *[f"- `{k}` = {v}" for k, v in params.items()],
            "",
            "All trials (best first):",
            "",
            "```",
            trials.to_string(index=False),
            "```",
        ]
        write_atomic(sweep_dir / "sweep_summary.md", "\n".join(lines) + "\n")
        log.info("sweep summary written to %s", sweep_dir / "sweep_summary.md")
