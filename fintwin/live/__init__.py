"""Live twins: each new event of a customer updates that customer's twin at once.

The step graph exported next to the full-history model takes a batch of (twin state, one new
event, the silence before it) and returns the new states and the same predictions; the live
model in Triton parses raw events, loads the customers' states from the state store
(``fintwin.live.store``: SQLite embedded, Redis in production, keyed by model, version and
customer), steps, and writes the new states together with the input stream's position, so
every event is applied exactly once and in timestamp order per customer. ``fintwin live``
bootstraps the states from a history file, feeds event streams through Triton in
micro-batches and shows a customer's current twin. Every event is also answered with the
twin's early warnings (``fintwin.live.alerts``: churn risk, unusual events), stored with the
state; ``fintwin live sweep`` finds overdue customers over the stored states.
"""
