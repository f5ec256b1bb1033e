"""`fintwin live run`: feed an event stream through a served live model in micro-batches.

Sources: JSON lines (a file, or stdin; an event's position is its line number) and Redis
Streams (``XREADGROUP`` in a consumer group; an event's position is its entry id). Each event
is a JSON object (a stream entry's fields) with the live model's inputs by name
(``customer_id``, ``timestamp``, ``event_type``, ``amount``, declared extras).

Each answer carries the alerts the event raised (``alerts``: churn_risk, unusual_event; see
``fintwin.live.alerts``), so the JSON lines or the Redis stream of answers are the alert feed
too; ``fintwin live sweep`` adds the overdue customers.

Every request carries each event's cursor ``CONSUMER:POSITION``, which the live model stores
with the states in one transaction. So a consumer that is killed at any point and started
again loses nothing and applies nothing twice: the live model answers events at or before its
stored position ``duplicate`` (applying nothing) and tells the stored position, after which
the runner skips the events up to it without sending them. Its first request holds one event,
to learn that position early. Predictions are written as JSON lines (or added to a Redis
stream) after each answer; the lines of a batch in flight when the consumer was killed may be
missing, the states never are. Redis entries are acknowledged (``XACK``) after their answers
are written; a restarted consumer first sends its pending entries again (answered
``duplicate`` when applied).

A request the model refuses as invalid (HTTP 400 / INVALID_ARGUMENT) is sent again event by
event, so that only the bad events get an error line; an event the runner cannot turn into the
model's inputs (not JSON, a missing field, a non-number amount) gets one without being sent.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from fintwin.data.features import stored_spec
from fintwin.live.events import CURSOR_FIELD, position_key
from fintwin.live.store import redis_client
from fintwin.live.triton_model import (
    ALERTS_OUTPUT,
    CURSOR_OUTPUT,
    SEQ_OUTPUT,
    STATUS_OUTPUT,
    TAILS_OUTPUT,
)
from fintwin.live.twins import APPLIED, DUPLICATE, named_predictions
from fintwin.serving.client import InvalidRequestError, TritonTransport, WireProtocol
from fintwin.serving.security import ClientCredentials

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 2.0
ANSWER_FIELDS = (STATUS_OUTPUT, SEQ_OUTPUT, CURSOR_OUTPUT, ALERTS_OUTPUT, TAILS_OUTPUT)


@dataclass
class StreamEvent:
    """One event of a stream: its position and its fields (None when unreadable: ``error``)."""

    position: str
    fields: dict | None
    error: str = ""


@dataclass
class RunStats:
    """What a run did: events answered by kind, and the rate."""

    applied: int = 0
    refused: int = 0  # out-of-order or conflict: answered, not applied
    skipped: int = 0  # at or before the consumer's stored position: applied before
    invalid: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def events(self) -> int:
        return self.applied + self.refused + self.skipped + self.invalid

    def line(self) -> str:
        seconds = max(time.monotonic() - self.started, 1e-9)
        return (f"fintwin live run: {self.events:,} events ({self.applied:,} applied, "
                f"{self.refused:,} refused, {self.skipped:,} applied before, {self.invalid:,} "
                f"invalid) in {seconds:.1f} s, {self.events / seconds:,.0f} events/s")


class LiveRunner:
    """Sends events to live model ``model`` at ``url`` in micro-batches of ``batch`` events,
    as consumer ``consumer``, and hands each event's answer to ``emit``; ``credentials``: TLS
    and API key of the server connection."""

    def __init__(self, url: str, protocol: WireProtocol, model: str, consumer: str,
                 batch: int = 64, timeout_s: float = 60.0,
                 credentials: ClientCredentials | None = None) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.transport = TritonTransport(url, protocol, model, timeout_s=timeout_s,
                                         credentials=credentials)
        config = self.transport.model_config()
        metadata = self.transport.metadata
        self.spec = stored_spec(metadata, f"live model {model!r}")
        self.quantiles = list(metadata.get("quantiles", []))
        self.inputs = {t["name"]: t["data_type"] for t in config.get("input", [])}
        self.required = [t["name"] for t in config.get("input", []) if not t.get("optional")]
        self.consumer, self.batch = consumer, batch
        self.stored: str | None = None  # the consumer's stored position, once answered
        self.stats = RunStats()

    def run(self, events: Iterable[StreamEvent], emit: Callable[[dict], None],
            acknowledge: Callable[[list[StreamEvent]], None] = lambda _: None,
            progress: TextIO | None = sys.stderr) -> RunStats:
        """Send every event of ``events`` (in micro-batches; the first of one event), emit
        the answers, acknowledge each batch after its answers; a progress line every
        ``PROGRESS_INTERVAL_S`` and at the end."""
        shown = time.monotonic()
        for chunk in self._batches(events):
            for answer in self.send(chunk):
                emit(answer)
            acknowledge(chunk)
            if progress is not None and time.monotonic() - shown >= PROGRESS_INTERVAL_S:
                print(self.stats.line(), file=progress, flush=True)
                shown = time.monotonic()
        if progress is not None:
            print(self.stats.line(), file=progress, flush=True)
        return self.stats

    def _batches(self, events: Iterable[StreamEvent]) -> Iterator[list[StreamEvent]]:
        chunk: list[StreamEvent] = []
        size = 1  # the first request learns the stored position
        for event in events:
            chunk.append(event)
            if len(chunk) >= size:
                yield chunk
                chunk, size = [], self.batch
        if chunk:
            yield chunk

    def send(self, chunk: list[StreamEvent]) -> list[dict]:
        """Answers of a chunk of events, in order (events already applied left out)."""
        answers: dict[int, dict] = {}
        ready: list[tuple[int, StreamEvent]] = []
        for index, event in enumerate(chunk):
            if self.stored is not None and position_key(event.position) <= position_key(self.stored):
                self.stats.skipped += 1
                continue
            problem = event.error or self._problem(event.fields)
            if problem:
                answers[index] = self._error(event, problem)
            else:
                ready.append((index, event))
        if ready:
            answers |= self._infer([event for _, event in ready], [i for i, _ in ready])
        return [answers[index] for index in sorted(answers)]

    def _infer(self, events: list[StreamEvent], indexes: list[int]) -> dict[int, dict]:
        try:
            outputs = self.transport.infer(self._inputs(events))
        except InvalidRequestError as exc:
            if len(events) == 1:
                return {indexes[0]: self._error(events[0], str(exc))}
            answers = {}
            for index, event in zip(indexes, events, strict=True):
                answers |= self._infer([event], [index])
            return answers
        stored = outputs[CURSOR_OUTPUT][0, 0].decode()
        self.stored = stored or self.stored
        answers = {}
        for row, (index, event) in enumerate(zip(indexes, events, strict=True)):
            answer = self._answer(event, {name: value[row] for name, value in outputs.items()})
            if answer is not None:
                answers[index] = answer
        return answers

    def _inputs(self, events: list[StreamEvent]) -> dict[str, np.ndarray]:
        inputs = {}
        for name, kind in self.inputs.items():
            if name == CURSOR_FIELD:
                values = [f"{self.consumer}:{event.position}".encode() for event in events]
            elif kind == "TYPE_FP32":
                values = [float(event.fields[name]) for event in events]
            else:
                values = [str(event.fields.get(name, "")).encode() for event in events]
            inputs[name] = np.array(values, dtype=np.float32 if kind == "TYPE_FP32" else object
                                    ).reshape(-1, 1)
        return inputs

    def _problem(self, fields: dict) -> str:
        """Why the runner cannot send an event ('' when it can)."""
        for name in self.required:
            if name not in fields or fields[name] is None:
                return f"missing field {name!r}; every event needs {self.required}"
        for name, kind in self.inputs.items():
            if kind == "TYPE_FP32" and name in fields:
                try:
                    float(fields[name])
                except (TypeError, ValueError):
                    return f"field {name!r}: {fields[name]!r} is not a number"
        return ""

    def _answer(self, event: StreamEvent, row: dict[str, np.ndarray]) -> dict | None:
        status = row[STATUS_OUTPUT][0].decode()
        if status.startswith(DUPLICATE):
            self.stats.skipped += 1
            return None
        if status == APPLIED:
            self.stats.applied += 1
        else:
            self.stats.refused += 1
        outputs = {name: value for name, value in row.items() if name not in ANSWER_FIELDS}
        return {
            "position": event.position,
            "customer_id": event.fields.get("customer_id"),
            "timestamp": event.fields.get("timestamp"),
            "status": status,
            "seq": int(row[SEQ_OUTPUT][0]),
            "predictions": named_predictions(outputs, self.spec, self.quantiles)
            if status == APPLIED else None,
            "alerts": json.loads(row[ALERTS_OUTPUT][0]) if status == APPLIED else [],
        }

    def _error(self, event: StreamEvent, problem: str) -> dict:
        self.stats.invalid += 1
        return {"position": event.position, "error": problem}

    def close(self) -> None:
        self.transport.close()


def jsonl_events(lines: Iterable[str]) -> Iterator[StreamEvent]:
    """Events of JSON lines, positioned by line number (1-based); blank lines are skipped."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as exc:
            yield StreamEvent(str(number), None, f"line {number}: not JSON ({exc.msg})")
            continue
        if not isinstance(fields, dict):
            yield StreamEvent(str(number), None, f"line {number}: expected a JSON object")
            continue
        yield StreamEvent(str(number), fields)


def jsonl_writer(stream: TextIO) -> Callable[[dict], None]:
    """Emit answers as JSON lines, flushed as written."""

    def emit(answer: dict) -> None:
        stream.write(json.dumps(answer) + "\n")
        stream.flush()

    return emit


class RedisStream:
    """Events of a Redis stream read in consumer group ``group`` as ``consumer``: first the
    consumer's pending entries (delivered before a crash, never acknowledged), then new ones;
    with ``exit_when_idle``, the iteration ends when no entry arrives for ``block_ms``."""

    def __init__(self, url: str, key: str, group: str, consumer: str, batch: int,
                 block_ms: int = 2000, exit_when_idle: bool = False) -> None:
        import redis

        self.redis = redis_client(url)
        self.key, self.group, self.consumer = key, group, consumer
        self.batch, self.block_ms, self.exit_when_idle = batch, block_ms, exit_when_idle
        try:
            self.redis.xgroup_create(key, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def __iter__(self) -> Iterator[StreamEvent]:
        after = "0"  # pending entries after this id; ">" once they are all read: new ones
        while True:
            reply = self.redis.xreadgroup(
                self.group, self.consumer, {self.key: after}, count=self.batch,
                block=None if after != ">" else self.block_ms,
            )
            entries = reply[0][1] if reply else []
            if not entries:
                if after == ">" and self.exit_when_idle:
                    return
                after = ">"
                continue
            for entry_id, fields in entries:
                yield StreamEvent(entry_id.decode(), {k.decode(): v.decode() for k, v in fields.items()})
            if after != ">":
                after = entries[-1][0].decode()

    def acknowledge(self, events: list[StreamEvent]) -> None:
        """``XACK`` the events whose answers are out."""
        if events:
            self.redis.xack(self.key, self.group, *[event.position for event in events])

    def writer(self, key: str) -> Callable[[dict], None]:
        """Emit answers to the stream ``key`` (one entry per answer, its JSON in ``answer``)."""

        def emit(answer: dict) -> None:
            self.redis.xadd(key, {"answer": json.dumps(answer)})

        return emit

    def close(self) -> None:
        self.redis.close()
