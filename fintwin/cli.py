"""`fintwin <command>`: data summary, export, serve, predict, simulate, report, live, monitor, explain.

Every command exits 0 on success, 2 on bad input (message on stderr, no traceback) and 1 on
an internal error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from fintwin.errors import FintwinInputError
from fintwin.files import atomic_path

if TYPE_CHECKING:
    from fintwin.serving.security import ClientCredentials

log = logging.getLogger("fintwin")


def _data_summary(args: argparse.Namespace) -> int:
    from fintwin.data.schema import EventSchema
    from fintwin.data.sources import CDNOW_FILES, CDNOW_SCHEMA, load_events

    schema = CDNOW_SCHEMA if args.source in CDNOW_FILES else EventSchema(
        numeric_features=args.numeric or [], categorical_features=args.categorical or [],
        day_first=args.day_first, decimal=args.decimal)
    events, report = load_events(args.source, schema, same_day_merge=args.merge_same_day)
    console = Console()
    table = Table(title=f"{args.source}: event data summary", show_header=False)
    table.add_row("customers", f"{events['customer_id'].nunique():,}")
    table.add_row("events", f"{len(events):,}" + (" (same-day merged)" if args.merge_same_day else ""))
    table.add_row("date range", f"{events['timestamp'].min()} to {events['timestamp'].max()}")
    table.add_row("exact duplicate rows", f"{report.duplicates:,}"
                  + (" (dropped)" if report.duplicates_dropped else " (kept)"))
    table.add_row("input was sorted", str(report.was_sorted))
    per_customer = events.groupby("customer_id", sort=False).size()
    table.add_row("events per customer (median / max)", f"{per_customer.median():g} / {per_customer.max():,}")
    quantiles = events["amount"].quantile([0.0, 0.25, 0.5, 0.75, 0.99, 1.0])
    table.add_row("amount quantiles (0/25/50/75/99/100%)", " / ".join(f"{q:,.2f}" for q in quantiles))
    mix = events["event_type"].value_counts(normalize=True)
    table.add_row("event types", ", ".join(f"{t} {p:.1%}" for t, p in mix.items()))
    console.print(table)
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="inspect event data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    summary = data_sub.add_parser(
        "summary", help="validate a source and summarise it",
        description="Validate an event source against the event contract and print a summary.",
        epilog="example: fintwin data summary cdnow\n         fintwin data summary events.parquet "
               "--numeric balance", formatter_class=argparse.RawDescriptionHelpFormatter)
    summary.add_argument("source", help="cdnow | cdnow_sample | synthetic | file.csv | file.parquet | directory")
    summary.add_argument("--numeric", nargs="*", help="declared numeric feature columns")
    summary.add_argument("--categorical", nargs="*", help="declared categorical feature columns")
    summary.add_argument("--merge-same-day", action="store_true",
                         help="merge a customer's same-type events of the same day")
    order = summary.add_mutually_exclusive_group()
    order.add_argument("--day-first", dest="day_first", action="store_const", const=True,
                       help="numeric dates are day first (31/12/2024) when the values leave it open")
    order.add_argument("--month-first", dest="day_first", action="store_const", const=False,
                       help="numeric dates are month first (12/31/2024) when the values leave it open")
    summary.add_argument("--decimal", choices=[".", ","],
                         help="decimal mark of text numbers when the values leave it open (1,234)")
    summary.set_defaults(handler=_data_summary)


def _command(sub: argparse._SubParsersAction, name: str, summary: str, example: str,
             handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=summary, description=summary, epilog=f"example: {example}",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=handler)
    return parser


def _export(args: argparse.Namespace) -> int:
    from fintwin.export.onnx import export_to_repository
    from fintwin.live.twins import live_model_name

    exported = export_to_repository(
        args.ckpt, args.repo, args.name, args.device, live=not args.no_live,
        max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
        instances=args.instances, reference_data=args.reference_data,
        explain=not args.no_explain)
    print(f"exported {args.repo / args.name}/{exported.version}/model.onnx "
          f"(ONNX parity: worst scaled difference {exported.report.worst:.1e})")
    if exported.live_version is not None:
        print(f"exported {args.repo / live_model_name(args.name)}/{exported.live_version}/"
              "step.onnx, the live model (step graph parity: worst scaled difference "
              f"{exported.step_report.worst:.1e})")
    if exported.explain_version is not None:
        print(f"exported {args.repo / args.name}_explain/{exported.explain_version}, the "
              "explanation model (reasons for customers' events)")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    parser = _command(sub, "export", "Export a checkpoint to ONNX (parity-checked) as a new version "
                      "of a Triton model repository.",
                      "fintwin export --ckpt outputs/train/runs/X/checkpoints/epoch_011.ckpt "
                      "--repo model_repository --name fintwin", _export)
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint written by train.py")
    parser.add_argument("--repo", type=Path, required=True, help="Triton model repository directory")
    parser.add_argument("--name", default="fintwin", help="model name in the repository")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="instance group kind")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--max-queue-delay-us", type=int, default=100)
    parser.add_argument("--instances", type=int, default=1, help="model instances per device")
    parser.add_argument("--no-live", action="store_true",
                        help="skip the live model NAME_live (raw events in, per-event state)")
    parser.add_argument("--reference-data", help="events whose calibration period (up to the "
                        "checkpoint's cut-off) is the drift reference (default: the training data)")
    parser.add_argument("--no-explain", action="store_true",
                        help="skip the explanation model NAME_explain (reasons from Triton)")


def _serve(args: argparse.Namespace) -> int:
    from fintwin.serving.security import (
        ADMIN_KEY_ENV,
        API_KEY_ENV,
        AccessControl,
        ServerTls,
        read_key,
    )
    from fintwin.serving.server import serve

    if (args.tls_cert is None) != (args.tls_key is None):
        raise FintwinInputError("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise FintwinInputError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    tls = None if args.tls_cert is None else ServerTls(args.tls_cert, args.tls_key,
                                                       args.tls_client_ca)
    admin_key = read_key(args.admin_key_file, ADMIN_KEY_ENV, "admin key")
    access = AccessControl(read_key(args.api_key_file, API_KEY_ENV, "API key"),
                           **({} if admin_key is None else {"admin_key": admin_key}))
    return serve(args.repo, args.host, args.http_port, args.grpc_port, args.metrics_port,
                 intra_op_threads=args.threads, tls=tls, access=access)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    parser = _command(sub, "serve", "Serve a model repository with the embedded Triton server "
                      "until SIGINT/SIGTERM. Exits 1 within about a second if tritonserver or a "
                      "model's python backend stub dies (e.g. out of memory), for a supervisor to "
                      "restart it.", "fintwin serve --repo model_repository --grpc-port 8001",
                      _serve)
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per instance")
    security = parser.add_argument_group(
        "security", "TLS of the gRPC endpoint (HTTP and metrics then bind 127.0.0.1, for a "
        "TLS-terminating proxy) and access keys. Keys come from a file or the environment only.")
    security.add_argument("--tls-cert", type=Path, help="server certificate (chain), PEM")
    security.add_argument("--tls-key", type=Path, help="server private key, PEM, unencrypted")
    security.add_argument("--tls-client-ca", type=Path, help="CA of client certificates: "
                          "mutual TLS, clients without one are refused")
    security.add_argument("--api-key-file", type=Path, help="inference needs this key in the "
                          "fintwin-api-key header (default: $FINTWIN_API_KEY; none: open)")
    security.add_argument("--admin-key-file", type=Path, help="key of the administrative APIs "
                          "(repository, shared memory, statistics, trace, logging) in the "
                          "fintwin-admin-key header (default: $FINTWIN_ADMIN_KEY; none: a "
                          "random one, i.e. closed)")


def _add_client_security(parser: argparse.ArgumentParser) -> None:
    """TLS and API key options of a command that talks to a served model."""
    group = parser.add_argument_group("security", "TLS to the server (mutual with a client "
                                      "certificate) and the API key (from a file or "
                                      "$FINTWIN_API_KEY only)")
    group.add_argument("--tls", action="store_true", help="speak TLS, trusting the system's CAs")
    group.add_argument("--tls-ca", type=Path, help="CA bundle of the server's certificate (TLS)")
    group.add_argument("--tls-cert", type=Path, help="client certificate, PEM (mutual TLS)")
    group.add_argument("--tls-key", type=Path, help="client private key, PEM (mutual TLS)")
    group.add_argument("--api-key-file", type=Path,
                       help="file holding the API key (default: $FINTWIN_API_KEY)")


def client_credentials(args: argparse.Namespace) -> ClientCredentials:
    """The ClientCredentials a command's security options ask for."""
    from fintwin.serving.security import API_KEY_ENV, ClientCredentials, ClientTls, read_key

    if (args.tls_cert is None) != (args.tls_key is None):
        raise FintwinInputError("--tls-cert and --tls-key go together")
    wants_tls = args.tls or args.tls_ca is not None or args.tls_cert is not None
    tls = ClientTls(args.tls_ca, args.tls_cert, args.tls_key) if wants_tls else None
    return ClientCredentials(tls, read_key(args.api_key_file, API_KEY_ENV, "API key"))


def _predict(args: argparse.Namespace) -> int:
    from fintwin.serving.client import TwinClient

    if (args.url is None) == (args.repo is None):
        raise FintwinInputError("give exactly one of --url HOST:PORT or --repo DIR")
    if args.repo is not None and (args.tls or args.tls_ca or args.tls_cert or args.api_key_file):
        raise FintwinInputError("--tls, --tls-ca, --tls-cert and --api-key-file apply to --url "
                                "(a server), not to --repo")
    credentials = client_credentials(args) if args.url is not None else None
    client = TwinClient(args.url, args.protocol, args.model, args.version or "", repo=args.repo,
                        batch_size=args.batch_size, top_k=args.top_k, credentials=credentials)
    try:
        predictions = client.predict(args.events, progress=True, as_of=args.as_of)
    finally:
        client.close()
    write_table_atomic(predictions, args.out)
    print(f"{len(predictions):,} customers scored -> {args.out}")
    return 0


def write_table_atomic(frame, path: Path) -> None:
    """Write a DataFrame as Parquet (or CSV by extension) atomically."""
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_parquet(tmp, index=False)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    parser = _command(sub, "predict", "Score customers' events with a served or local twin: one row "
                      "per customer (top-k next types, time to next event, amount, churn, horizon).",
                      "fintwin predict --url 127.0.0.1:8001 --model fintwin --events events.csv "
                      "--out preds.parquet", _predict)
    parser.add_argument("--url", help="Triton endpoint host:port")
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--repo", type=Path, help="model repository: score in process (batch scoring)")
    parser.add_argument("--model", default="fintwin")
    parser.add_argument("--version", default="")
    parser.add_argument("--events", required=True, help="CSV / Parquet file or directory of raw events")
    parser.add_argument("--out", type=Path, required=True, help="output .parquet or .csv")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--as-of", help="day the horizon forecast starts after (its end; default: "
                        "the last day in --events); no event may come after it")
    _add_client_security(parser)


def _add_twin_arguments(parser: argparse.ArgumentParser, end_flag: str, end_help: str) -> None:
    """Arguments shared by simulate and report (after ``--ckpt``): data, window, samples."""
    parser.add_argument("--data", required=True, help="cdnow | synthetic | events file or directory")
    parser.add_argument("--cutoff", required=True, help="last observed (calibration) day, inclusive")
    parser.add_argument(end_flag, required=True, help=end_help)
    parser.add_argument("--samples", type=int, default=100, help="Monte Carlo paths per customer")


def _simulate(args: argparse.Namespace) -> int:
    from fintwin.twin.pipeline import simulate

    summary = simulate(args.ckpt, args.data, args.cutoff, args.horizon_end, args.samples, args.out,
                       what_if=args.what_if, seed=args.seed, paths_out=args.paths_out,
                       device=args.device)
    print(f"{len(summary):,} customers simulated x {args.samples} samples -> {args.out}")
    if "overall" in summary.attrs:
        print("what-if effect:", ", ".join(f"{k} {v:.4g}" for k, v in summary.attrs["overall"].items()))
    return 0


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    parser = _command(sub, "simulate", "Monte Carlo rollouts of each customer's future from a cut-off "
                      "to a horizon end (optionally with injected what-if events).",
                      "fintwin simulate --ckpt epoch_011.ckpt --data cdnow --cutoff 1997-09-30 "
                      "--horizon-end 1998-06-30 --samples 100 --out futures.parquet", _simulate)
    parser.add_argument("--ckpt", type=Path, nargs="+", required=True,
                        help="checkpoint(s) written by train.py; several (e.g. seeds) pool "
                        "their paths as an ensemble twin")
    _add_twin_arguments(parser, "--horizon-end", "last simulated day (inclusive)")
    parser.add_argument("--out", type=Path, required=True, help="per-customer summary (.parquet)")
    parser.add_argument("--what-if", type=Path, help="CSV/Parquet of injected events "
                        "(customer_id or '*', timestamp, event_type, amount)")
    parser.add_argument("--paths-out", type=Path, help="also write every sampled event (.parquet)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")


def _report(args: argparse.Namespace) -> int:
    from fintwin.twin.evaluation import METRIC_KEYS
    from fintwin.twin.pipeline import report
    from fintwin.twin.scores import SCORE_KEYS

    metrics = report(args.ckpt, args.data, args.cutoff, args.holdout_end, args.out,
                     samples=args.samples, seed=args.seed, device=args.device)
    console = Console()
    for title, keys in ((f"holdout {args.cutoff} .. {args.holdout_end}", METRIC_KEYS),
                        ("predictive distributions (log score: higher is better)", SCORE_KEYS)):
        models = [m for m in metrics if any(key in metrics[m] for key in keys)]
        table = Table(title=title)
        table.add_column("metric")
        for model in models:
            table.add_column(model, justify="right")
        for key in keys:
            table.add_row(key, *(f"{metrics[m].get(key, float('nan')):.4g}" for m in models))
        console.print(table)
    print(f"report -> {args.out / 'report.html'}")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    parser = _command(sub, "report", "Forecast a holdout window with the twin (rollouts and direct "
                      "heads) and BG/NBD + Gamma-Gamma; write metrics.json, plots and report.html.",
                      "fintwin report --ckpt epoch_011.ckpt --data cdnow --cutoff 1997-09-30 "
                      "--holdout-end 1998-06-30 --out report/", _report)
    parser.add_argument("--ckpt", type=Path, nargs="+", required=True,
                        help="checkpoint(s) written by train.py; several (e.g. seeds) are "
                        "averaged as an ensemble twin")
    _add_twin_arguments(parser, "--holdout-end", "last holdout day (inclusive)")
    parser.add_argument("--out", type=Path, required=True, help="report directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")


def _live_store_url(args: argparse.Namespace) -> str:
    from fintwin.live.triton_model import store_url

    return store_url(args.store or "", args.repo)


def _live_bootstrap(args: argparse.Namespace) -> int:
    from fintwin.live.store import open_store
    from fintwin.live.twins import live_model_name, open_live_twins

    url = _live_store_url(args)
    started = time.monotonic()
    with open_store(url) as store:
        twins = open_live_twins(args.repo, live_model_name(args.model), store, args.version,
                                threads=0)
        report = twins.bootstrap(args.events)
    seconds = time.monotonic() - started
    print(f"bootstrapped {report.customers:,} customers ({report.events:,} events) of "
          f"{twins.model} version {twins.version} in {seconds:.1f} s"
          + (f"; {report.kept:,} customers had a state already and were left as they were"
             if report.kept else ""))
    return 0


def _live_get(args: argparse.Namespace) -> int:
    from fintwin.live.alerts import stored_alerts
    from fintwin.live.store import open_store
    from fintwin.live.twins import live_model_name, open_live_twins

    with open_store(_live_store_url(args)) as store:
        twins = open_live_twins(args.repo, live_model_name(args.model), store, args.version)
        summary = twins.summary(args.customer)
        summary["alerts"] = stored_alerts(store, twins.model, twins.version, [args.customer])
        print(json.dumps(summary, indent=2))
    return 0


def _live_sweep(args: argparse.Namespace) -> int:
    import pandas as pd
    import redis

    from fintwin.live.alerts import sweep
    from fintwin.live.runner import jsonl_writer
    from fintwin.live.store import open_store
    from fintwin.live.twins import live_model_name, open_live_twins

    if args.every < 0:
        raise FintwinInputError(f"--every {args.every}: expected seconds >= 0")
    if bool(args.redis_out) != bool(args.redis_url):
        raise FintwinInputError("--redis-out KEY and --redis-url URL go together")
    try:
        as_of = None if args.as_of is None else pd.Timestamp(args.as_of)
    except ValueError as exc:
        raise FintwinInputError(f"--as-of {args.as_of!r}: not a timestamp ({exc})") from None
    if as_of is not None and as_of.tzinfo is not None:
        as_of = as_of.tz_convert("UTC").tz_localize(None)
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(open_store(_live_store_url(args)))
        twins = open_live_twins(args.repo, live_model_name(args.model), store, args.version)
        if args.redis_out:
            client = stack.enter_context(redis.Redis.from_url(args.redis_url))

            def emit(alert: dict) -> None:
                client.xadd(args.redis_out, {"alert": json.dumps(alert)})
        else:
            emit = jsonl_writer(sys.stdout if args.out == "-" else stack.enter_context(
                open(args.out, "a", encoding="utf-8")))
        while True:
            now = as_of if as_of is not None else pd.Timestamp.now("UTC").tz_localize(None)
            found = 0
            for overdue in sweep(store, twins.model, twins.version, twins.alerts, now.value):
                emit({"customer_key": overdue.customer_key} | overdue.alert)
                found += 1
            print(f"fintwin live sweep: {found:,} new overdue customers as of {now}",
                  file=sys.stderr, flush=True)
            if not args.every or as_of is not None:
                return 0
            time.sleep(args.every)


def _live_run(args: argparse.Namespace) -> int:
    import socket

    from fintwin.live.runner import LiveRunner, RedisStream, jsonl_events, jsonl_writer
    from fintwin.live.twins import live_model_name

    if (args.input is None) == (args.redis_stream is None):
        raise FintwinInputError("give exactly one of --input FILE|- or --redis-stream KEY")
    if args.redis_stream is not None and not (args.redis_url and args.group):
        raise FintwinInputError("--redis-stream needs --redis-url URL and --group NAME")
    if args.redis_out and args.redis_stream is None:
        raise FintwinInputError("--redis-out needs --redis-stream (answers go where events come from)")
    if args.input is not None:
        consumer = args.consumer or ("stdin" if args.input == "-"
                                     else f"jsonl:{Path(args.input).resolve()}")
    else:
        consumer = args.consumer or socket.gethostname()
    runner = LiveRunner(args.url, args.protocol, live_model_name(args.model), consumer,
                        args.batch, credentials=client_credentials(args))
    with contextlib.ExitStack() as stack:
        stack.callback(runner.close)
        if args.input is not None:
            lines = sys.stdin if args.input == "-" else stack.enter_context(
                open(args.input, encoding="utf-8"))
            events, acknowledge = jsonl_events(lines), lambda _: None
        else:
            stream = RedisStream(args.redis_url, args.redis_stream, args.group, consumer,
                                 args.batch, exit_when_idle=args.exit_when_idle)
            stack.callback(stream.close)
            events, acknowledge = stream, stream.acknowledge
        if args.redis_out:
            emit = stream.writer(args.redis_out)
        else:
            out = sys.stdout if args.out == "-" else stack.enter_context(
                open(args.out, "a", encoding="utf-8"))
            emit = jsonl_writer(out)
        stats = runner.run(events, emit, acknowledge)
    if stats.invalid:
        raise FintwinInputError(f"{stats.invalid:,} events were refused as invalid; each has an "
                                "error line (position, error) among the answers")
    return 0


def _add_live(sub: argparse._SubParsersAction) -> None:
    live = sub.add_parser("live", help="live twins: per-event state through the live model",
                          description="Live twins: the live model NAME_live that `fintwin "
                          "export` writes steps each customer's twin per raw event and keeps "
                          "its state in a state store (SQLite or Redis).")
    live_sub = live.add_subparsers(dest="live_command", required=True)
    store_help = ("state store: sqlite:///PATH or redis://HOST:PORT/DB (default: "
                  "$FINTWIN_STATE_STORE, else DIR-states.db next to the repository, as the "
                  "live model)")

    bootstrap = _command(live_sub, "bootstrap", "Compute the twin state of every customer of "
                         "a history file (batched) and store it with the customer's event count; "
                         "customers with a state are left as they are.",
                         "fintwin live bootstrap --repo model_repository --model twin --events "
                         "history.csv --store redis://127.0.0.1:6379/0", _live_bootstrap)
    bootstrap.add_argument("--events", required=True, help="CSV / Parquet file or directory")

    run = _command(live_sub, "run", "Feed raw events (JSON lines, or a Redis stream) through a "
                   "served live model in micro-batches and emit each event's answer as a JSON "
                   "line; a restarted run resumes after the position stored with the states.",
                   "fintwin live run --url 127.0.0.1:8001 --model twin --input events.jsonl "
                   "--out answers.jsonl", _live_run)
    run.add_argument("--url", required=True, help="Triton endpoint host:port")
    run.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    run.add_argument("--model", default="fintwin", help="model NAME (its live model NAME_live)")
    run.add_argument("--input", help="JSON-lines file, or - for stdin")
    run.add_argument("--batch", type=int, default=64, help="events per request")
    run.add_argument("--out", default="-", help="answers as JSON lines, appended (- : stdout)")
    run.add_argument("--consumer", help="name of this consumer's stored stream position "
                     "(default: the input file's path; stdin; the host name for Redis)")
    run.add_argument("--redis-stream", help="read events from this Redis stream (entries' "
                     "fields are the event's)")
    run.add_argument("--redis-url", help="Redis of --redis-stream, redis://HOST:PORT/DB")
    run.add_argument("--group", help="consumer group of --redis-stream")
    run.add_argument("--redis-out", help="add answers to this Redis stream instead of --out")
    run.add_argument("--exit-when-idle", action="store_true",
                     help="stop when --redis-stream has no new entry for 2 s")
    _add_client_security(run)

    get = _command(live_sub, "get", "Show a customer's twin: events applied, last event time "
                   "and its predictions right after it.",
                   "fintwin live get c042 --repo model_repository --model twin", _live_get)
    get.add_argument("customer", help="customer id")

    sweep = _command(live_sub, "sweep", "Find overdue customers: those whose silence has passed "
                     "the live model's alert_overdue_level quantile of their predicted time to "
                     "the next event; emit each once per silence as a JSON line (or to a Redis "
                     "stream) and store it with the customer's alerts.",
                     "fintwin live sweep --repo model_repository --model twin --every 3600 "
                     "--out overdue.jsonl", _live_sweep)
    sweep.add_argument("--as-of", help="sweep once at this time (ISO-8601; default: now, UTC)")
    sweep.add_argument("--every", type=float, default=0.0,
                       help="sweep again every this many seconds (default 0: once)")
    sweep.add_argument("--out", default="-", help="alerts as JSON lines, appended (- : stdout)")
    sweep.add_argument("--redis-url", help="Redis of --redis-out, redis://HOST:PORT/DB")
    sweep.add_argument("--redis-out", help="add alerts to this Redis stream instead of --out")
    for parser in (bootstrap, get, sweep):
        parser.add_argument("--repo", type=Path, required=True, help="exported model repository")
        parser.add_argument("--model", default="fintwin",
                            help="model NAME (its live model NAME_live)")
        parser.add_argument("--version", type=int, help="live model version (default: latest)")
        parser.add_argument("--store", help=store_help)


def _monitor(args: argparse.Namespace) -> int:
    from fintwin.monitor.drift import Thresholds
    from fintwin.monitor.offline import monitor

    report = monitor(args.repo, args.model, args.events, args.out, args.window,
                     Thresholds(args.watch, args.act))
    for name, value in report.overall.items():
        print(f"{name:>16}  PSI {value:7.3f}  {report.thresholds.level(value)}")
    print(f"{len(report.drifted())} drifted (PSI >= {args.watch}) -> {args.out / 'index.html'}")
    return 0


def _add_monitor(sub: argparse._SubParsersAction) -> None:
    parser = _command(sub, "monitor", "Drift of an event file against an exported model's "
                      "reference (its calibration data): PSI per input and output, over the "
                      "whole file and per window, with plots, in an HTML page.",
                      "fintwin monitor --repo model_repository --model twin --events "
                      "events.csv --out drift/", _monitor)
    parser.add_argument("--repo", type=Path, required=True, help="exported model repository")
    parser.add_argument("--model", default="fintwin", help="model NAME (outputs from NAME_live)")
    parser.add_argument("--events", required=True, help="CSV / Parquet file or directory")
    parser.add_argument("--out", type=Path, required=True, help="report directory")
    parser.add_argument("--window", default="M", help="pandas period of the windows: M, W, D")
    parser.add_argument("--watch", type=float, default=0.1, help="PSI level worth watching")
    parser.add_argument("--act", type=float, default=0.25, help="PSI level worth acting on")


def _add_explain(sub: argparse._SubParsersAction) -> None:
    from fintwin.explain.command import add_explain

    add_explain(sub, _command)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_data, _add_export, _add_serve, _add_predict, _add_simulate, _add_report, _add_live,
    _add_monitor, _add_explain]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(prog="fintwin", description="Customer digital twins.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fintwin` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
    try:
        return args.handler(args)
    except FintwinInputError as err:
        print(f"fintwin: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # internal error: keep the traceback for the log, exit 1
        log.exception("internal error: %s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
