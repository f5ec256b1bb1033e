"""Reason codes: explanation latency, faithfulness and agreement with the simulator's drivers.

Latency (one table): one customer with 64 and with 256 events, each encoder at its default
config (configs/model/*.yaml, random weights: the cost does not depend on training), CPU, one
torch thread, ``churn_prob``. Columns: the integration steps completeness needed; the
attribution alone (``Attributor.attribute`` on a featurised customer); `fintwin explain`'s
whole path in process (read and validate raw events, featurise, attribute, group into
reasons); and the explanation model served by the embedded Triton (gRPC round trip from raw
events to reasons; both models in one repository). p50 / p90 over ``--repeats`` calls.

Faithfulness: an LSTM twin is trained on a synthetic bank of 1,500 customers (2 epochs) and
on CDNOW's sample (8 epochs) with ``train.py`` (reused when ``--out`` holds the run). For
``--customers`` customers with at least 8 events before the cut-off, explained as of the
cut-off, each customer's k most attributed events are deleted (k = 1..5) and the history
scored again; likewise k random events (``RANDOM_DRAWS`` draws). The top-k are ranked by |attribution|, and
also ``signed``: by attribution in the direction of the events' net contribution (deleting
events that push both ways partly cancels). Cells: mean |change of the output| when deleting
the top-k / k random events, and their ratio (target >= 2x).

Drivers (synthetic bank, ``next_time_mean``: the expected next gap, whose log-median the
simulator sets from the last event's type (``gap_log_shift``), a weekend (``weekend_gap_shift``
+0.4) and the days since the last salary (``payday_gap_shift`` -0.8, fading over 4 days); a
30-day churn there is driven by the segments' dormancy instead, the gaps being days long).
Agreement: Spearman correlation of the mean attribution of the last event's type with
``gap_log_shift`` over the event types, pooled and within each true segment (a type also
tells the segment, whose gaps differ); the last event's calendar attribution on weekends minus
on weekdays (expected > 0); Spearman correlation of the salary-recency attribution with the
days since the last salary (expected > 0: the payday shortening fades).

Run from the repository root (the embedded server's models import fintwin from there):
      python bench/explain.py [--customers 100] [--repeats 20] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import tritonclient.grpc as grpcclient
from machine_info import machine
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from fintwin.data.features import FeaturiserSpec, Scaling, Vocab
from fintwin.data.sequences import calibration_events
from fintwin.data.simulator import EVENT_TYPES, SimulatorConfig, customer_segments
from fintwin.explain.attribution import Attributor, parse_output
from fintwin.explain.explainer import Explainer
from fintwin.explain.serving import (
    explain_files,
    explain_model_name,
    explain_served,
    write_explain_model,
)
from fintwin.models.checkpoint import load_twin
from fintwin.models.module import QUANTILE_LEVELS, TwinModule
from fintwin.serving.server import EmbeddedTriton

REPO = Path(__file__).resolve().parent.parent
LENGTHS = (64, 256)
KS = (1, 2, 3, 4, 5)
RANDOM_DRAWS = 5
MIN_EVENTS = 8
DRIVEN_OUTPUT = "next_time_mean"  # the next gap: the output the simulator's gap factors drive
SCALING = {"amount_mean": 3.5, "amount_std": 1.2, "delta_t_mean": 1.6, "delta_t_std": 1.0,
           "gap_log_mean": 0.5, "gap_log_std": 1.0}
TRAIN = {  # about 300,000 synthetic events: two epochs suffice for a small demonstration
    "synthetic": ["experiment=synthetic_lstm", "data.simulator.n_customers=1500",
                  "trainer.max_epochs=2"],
    "cdnow": ["experiment=cdnow_lstm", "data.source=cdnow_sample", "trainer.max_epochs=8"],
}
COMMON = ["trainer=cpu", "trainer.enable_progress_bar=false", "callbacks.rich_progress_bar=null",
          "test=false", "seed=0"]
WORLD = SimulatorConfig(n_customers=1500, seed=0)  # the synthetic run's world


# ------------------------------------------------------------------ latency
def default_twin(encoder: str) -> tuple[TwinModule, FeaturiserSpec]:
    config = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / f"{encoder}.yaml"))
    torch.manual_seed(0)
    vocab = Vocab.fit(np.array(EVENT_TYPES))
    model = TwinModule(encoder=config["encoder"], vocab_size=vocab.size, scaling=SCALING,
                       horizon_days=30.0, n_components=config["n_components"]).eval()
    spec = FeaturiserSpec(vocab, max_len=max(LENGTHS), horizon_days=30.0,
                          scaling=Scaling.from_dict(SCALING))
    return model, spec


def history(length: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    times = pd.Timestamp("2024-01-01") + pd.to_timedelta(np.sort(rng.uniform(0, 365, length)), "D")
    return pd.DataFrame({"customer_id": f"n{length}", "timestamp": times,
                         "event_type": rng.choice(EVENT_TYPES, length),
                         "amount": rng.lognormal(4, 1, length).round(2)})


def timed(repeats: int, call, *args) -> str:
    """p50 / p90 milliseconds of ``call(*args)`` after one warm-up call."""
    call(*args)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(*args)
        seconds.append(time.perf_counter() - start)
    p50, p90 = np.percentile(seconds, [50, 90]) * 1e3
    return f"{p50:.1f} / {p90:.1f}"


def latency_rows(repeats: int) -> list[list[str]]:
    torch.set_num_threads(1)
    cells = {}
    with tempfile.TemporaryDirectory(prefix="bench-explain-") as scratch:
        repo = Path(scratch) / "repo"
        for encoder in ("lstm", "transformer"):
            model, spec = default_twin(encoder)
            metadata = {"featuriser": spec.to_dict(), "quantiles": list(QUANTILE_LEVELS)}
            work = Path(scratch) / encoder
            work.mkdir()
            write_explain_model(repo, encoder, spec, metadata, explain_files(model, work))
            explainer, attributor = Explainer(model, spec), Attributor(model)
            selector = parse_output("churn_prob", spec)
            for length in LENGTHS:
                events = history(length)
                sequences = spec.inference_sequences(spec.read_events(events))
                batch = sequences.batch(np.arange(1), with_targets=False)
                batch["days_since_last_event"] = torch.zeros(1)
                steps = int(attributor.attribute(batch, selector).steps[0])
                cells[encoder, length] = [
                    encoder, str(length), str(steps),
                    timed(repeats, attributor.attribute, batch, selector),
                    timed(repeats, explainer.explain, events, "churn_prob"),
                ]
        with EmbeddedTriton(repo, startup_timeout_s=240) as server:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            for (encoder, length), row in cells.items():
                row.append(timed(repeats, explain_served, client, explain_model_name(encoder),
                                 history(length)))
            client.close()
    return list(cells.values())


# ------------------------------------------------------------ faithfulness
def train(name: str, out: Path) -> Path:
    run_dir = out / name
    chosen = sorted((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    if not chosen:
        command = [sys.executable, "train.py", *TRAIN[name], *COMMON, f"hydra.run.dir={run_dir}"]
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        chosen = sorted((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    return chosen[-1]


def calibration(name: str, explainer: Explainer, cutoff: str) -> pd.DataFrame:
    config = WORLD if name == "synthetic" else None
    return calibration_events(explainer.spec.read_events(name, simulator_config=config), cutoff)


def chosen_customers(events: pd.DataFrame, count: int, seed: int = 0) -> list[str]:
    sizes = events.groupby("customer_id").size()
    eligible = sizes[sizes >= MIN_EVENTS].index.to_numpy()
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(eligible, min(count, len(eligible)), replace=False).tolist())


def predictions(explainer: Explainer, events: pd.DataFrame, output: str, as_of: str) -> pd.Series:
    sequences = explainer.spec.inference_sequences(events, as_of)
    silence = sequences.days_since_last_event().astype(np.float32)
    values = []
    for lo in range(0, len(sequences), 256):
        index = np.arange(lo, min(lo + 256, len(sequences)))
        batch = sequences.batch(index, with_targets=False)
        batch["days_since_last_event"] = torch.from_numpy(silence[index])
        with torch.no_grad():
            values.append(explainer.model.predict_last(batch, [output])[output].numpy())
    return pd.Series(np.concatenate(values), index=sequences.customer_ids)


def ranked_events(attributions: np.ndarray, ranking: str) -> np.ndarray:
    """Event positions, most attributed first: by |attribution|, or ``signed``: by attribution
    in the direction of the events' net contribution (deleting them moves the output one way)."""
    if ranking == "signed":
        return np.argsort(-np.sign(attributions.sum()) * attributions)
    return np.argsort(-np.abs(attributions))


def deletion_curve(explainer: Explainer, events: pd.DataFrame, explanations, output: str,
                   as_of: str, ranking: str, seed: int = 0) -> dict[int, tuple[float, float]]:
    """Per k: mean |change| deleting the top-k attributed events (``ranked_events``), and k
    random ones."""
    rng = np.random.default_rng(seed)
    by_customer = dict(tuple(events.groupby("customer_id", sort=False)))
    variants, kinds = [], {}
    for e in explanations:
        rows = by_customer[e.customer_id]
        kept = rows.index[-len(e.events):]  # the events the twin reads
        order = ranked_events(e.events["attr_total"].to_numpy(), ranking)
        for k in KS:
            draws = {"top": [order[:k]]} | {
                f"r{r}": [rng.choice(len(kept), k, replace=False)] for r in range(RANDOM_DRAWS)}
            for label, (picked,) in draws.items():
                name = f"{e.customer_id}#{k}#{label}"
                variants.append(rows.drop(index=kept[picked]).assign(customer_id=name))
                kinds[name] = (e.customer_id, k, label == "top")
    scored = predictions(explainer, pd.concat(variants, ignore_index=True), output, as_of)
    base = {e.customer_id: e.prediction for e in explanations}
    change = pd.DataFrame([(k, top, abs(scored[name] - base[cid]))
                           for name, (cid, k, top) in kinds.items()], columns=["k", "top", "change"])
    means = change.groupby(["k", "top"])["change"].mean()
    return {k: (float(means[k, True]), float(means[k, False])) for k in KS}


def drivers(explanations) -> list[tuple[str, str, str]]:
    """Agreement of ``DRIVEN_OUTPUT``'s attributions with the simulator's drivers (module doc)."""
    shift = dict(zip(EVENT_TYPES, WORLD.gap_log_shift, strict=True))
    segments = customer_segments(WORLD)
    last = pd.DataFrame([
        {"type": e.events["event_type"].iloc[-1], "attr_type": e.events["attr_type"].iloc[-1],
         "weekend": e.events["timestamp"].iloc[-1].dayofweek >= 5,
         "attr_calendar": e.events["attr_calendar"].iloc[-1],
         "since_salary": _since_salary(e.events), "attr_salary": e.history.get("recency:salary"),
         "segment": segments[e.customer_id]}
        for e in explanations])
    per_type = last.groupby("type")["attr_type"].mean()
    rho_type = spearmanr(per_type.to_numpy(), [shift[t] for t in per_type.index]).statistic
    within = []  # the same within each true segment (the type also reveals the segment)
    for _, group in last.groupby("segment"):
        means = group.groupby("type")["attr_type"].mean()
        if len(means) >= 3:
            within.append(spearmanr(means.to_numpy(), [shift[t] for t in means.index]).statistic)
    weekend = last.groupby("weekend")["attr_calendar"].mean()
    salaried = last.dropna(subset=["since_salary"])
    rho_salary = spearmanr(salaried["since_salary"], salaried["attr_salary"]).statistic
    return [
        ("last event's type (gap_log_shift)",
         f"Spearman {rho_type:+.2f} over {len(per_type)} types",
         ", ".join(f"{t} {v:+.3f}" for t, v in per_type.sort_values().items())),
        ("last event's type, within each true segment",
         f"mean Spearman {np.nanmean(within):+.2f} over {len(within)} segments",
         ", ".join(f"{rho:+.2f}" for rho in within)),
        ("last event on a weekend (weekend_gap_shift +0.4)",
         f"{weekend.get(True, np.nan) - weekend.get(False, np.nan):+.4f}",
         f"weekend {weekend.get(True, np.nan):+.4f}, weekday {weekend.get(False, np.nan):+.4f}"),
        ("days since the last salary (payday effect)",
         f"Spearman {rho_salary:+.2f}", f"{len(salaried)} customers with a salary"),
    ]


def _since_salary(events: pd.DataFrame) -> float | None:
    salaries = events["timestamp"][events["event_type"] == "salary"]
    if salaries.empty:
        return None
    return (events["timestamp"].iloc[-1] - salaries.iloc[-1]).total_seconds() / 86_400


def faithfulness(customers: int, out: Path):
    curves, agreement = [], []
    for name in ("synthetic", "cdnow"):
        twin = load_twin(train(name, out))
        explainer, cutoff = Explainer(twin.model, twin.spec), str(twin.split["cutoff"])
        events = calibration(name, explainer, cutoff)
        chosen = chosen_customers(events, customers)
        events = events[events["customer_id"].isin(set(chosen))].reset_index(drop=True)
        for output in ("churn_prob", "horizon_spend"):
            explanations = explainer.explain(events, output, as_of=cutoff)
            unconverged = sum(not e.converged for e in explanations)
            count = f"{len(explanations)}" + (f" ({unconverged} over)" if unconverged else "")
            for ranking in ("|attribution|", "signed"):
                curve = deletion_curve(explainer, events, explanations, output, cutoff, ranking)
                curves.append([name, output, count, ranking] + [
                    f"{top:.4g} / {rand:.4g} ({top / rand:.1f}x)" for top, rand in curve.values()])
        if name == "synthetic":
            agreement = drivers(explainer.explain(events, DRIVEN_OUTPUT, as_of=cutoff))
    return curves, agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_explain")
    args = parser.parse_args()
    console = Console(width=200)
    started = datetime.now(UTC)
    console.print(f"{started:%Y-%m-%d %H:%M} UTC, {machine()}, load average "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    table = Table(title="Explanation latency per customer (churn_prob, CPU, 1 torch thread; "
                  "p50 / p90 ms)")
    for column in ("encoder", "events", "IG steps", "attribution", "fintwin explain (in process)",
                   "served (embedded Triton, gRPC)"):
        table.add_column(column, justify="right")
    for row in latency_rows(args.repeats):
        table.add_row(*row)
    console.print(table)
    console.print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    curves, agreement = faithfulness(args.customers, args.out)
    table = Table(title="Faithfulness: mean |change| deleting the top-k attributed events / k "
                  "random events (ratio)")
    for column in ("data", "output", "customers", "ranking", *(f"k={k}" for k in KS)):
        table.add_column(column, justify="right")
    for row in curves:
        table.add_row(*row)
    console.print(table)
    table = Table(title=f"Synthetic bank: {DRIVEN_OUTPUT} attributions vs the simulator's drivers")
    for column in ("driver", "agreement", "detail"):
        table.add_column(column)
    for row in agreement:
        table.add_row(*row)
    console.print(table)
    console.print(f"done in {(datetime.now(UTC) - started).total_seconds() / 60:.1f} min, "
                  f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
