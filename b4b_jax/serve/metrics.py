"""Prometheus metrics of the service (its own registry, served at /metrics).

  b4b_requests_total{endpoint, status}      requests answered, by HTTP status
  b4b_request_seconds{endpoint}             latency histogram (parse + queue + device + commit + answer)
  b4b_batch_rows / b4b_batch_requests       micro-batch sizes (histograms)
  b4b_rows_total                            images answered (rows/s = rate(b4b_rows_total))
  b4b_device_seconds                        encoder + defense call per batch (histogram)
  b4b_journal_commit_seconds                group commit per batch (histogram)
  b4b_queue_wait_seconds                    time a request waited before its batch ran
  b4b_accounts_above_coverage{threshold}    accounts whose coverage is at or above the threshold(s)
  b4b_snapshot_seconds, b4b_journal_entries, b4b_up
"""
import threading
from typing import Dict, Sequence

import prometheus_client as prom

_LATENCY = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:

  def __init__(self, coverage_thresholds: Sequence[float] = (10.0, 50.0)):
    self.registry = prom.CollectorRegistry(auto_describe=True)
    r = self.registry
    self.requests = prom.Counter("b4b_requests", "Requests answered", ["endpoint", "status"],
                                 registry=r)
    self.latency = prom.Histogram("b4b_request_seconds", "Request latency", ["endpoint"],
                                  buckets=_LATENCY, registry=r)
    self.batch_rows = prom.Histogram("b4b_batch_rows", "Rows per micro-batch", buckets=_ROWS,
                                     registry=r)
    self.batch_requests = prom.Histogram("b4b_batch_requests", "Requests per micro-batch",
                                         buckets=_ROWS, registry=r)
    self.rows = prom.Counter("b4b_rows", "Images answered", registry=r)
    self.device = prom.Histogram("b4b_device_seconds", "Encoder + defense call per batch",
                                 buckets=_LATENCY, registry=r)
    self.commit = prom.Histogram("b4b_journal_commit_seconds", "From a batch's device call's end to "
                                 "its journal commit (commit-thread queue + SQLite transaction)",
                                 buckets=_LATENCY, registry=r)
    self.decode = prom.Histogram("b4b_decode_seconds", "Authentication + image decoding per request "
                                 "(on a worker thread)", buckets=_LATENCY, registry=r)
    self.queue_wait = prom.Histogram("b4b_queue_wait_seconds", "Wait before a request's batch ran",
                                     buckets=_LATENCY, registry=r)
    self.snapshot = prom.Histogram("b4b_snapshot_seconds", "Snapshot save time", buckets=_LATENCY,
                                   registry=r)
    self.journal_entries = prom.Gauge("b4b_journal_entries", "Journal entries since the last snapshot",
                                      registry=r)
    self.up = prom.Gauge("b4b_up", "1 while the service answers queries", registry=r)
    self._above = prom.Gauge("b4b_accounts_above_coverage", "Accounts at or above a coverage (%)",
                             ["threshold"], registry=r)
    self._thresholds = [float(t) for t in coverage_thresholds]
    self._coverage: Dict[str, float] = {}
    self._lock = threading.Lock()
    for t in self._thresholds:
      self._above.labels(threshold=f"{t:g}").set(0)

  def set_coverage(self, coverage: Dict[str, float]) -> None:
    """Latest coverage per account (after a batch, or all accounts at start)."""
    with self._lock:
      self._coverage.update(coverage)
      values = list(self._coverage.values())
    for t in self._thresholds:
      self._above.labels(threshold=f"{t:g}").set(sum(1 for c in values if c >= t))

  def on_batch(self, rows: int, requests: int, device_s: float, commit_s: float, waits) -> None:
    self.batch_rows.observe(rows)
    self.batch_requests.observe(requests)
    self.rows.inc(rows)
    self.device.observe(device_s)
    self.commit.observe(commit_s)
    for w in waits:
      self.queue_wait.observe(max(0.0, w))

  def render(self) -> bytes:
    return prom.generate_latest(self.registry)

  CONTENT_TYPE = prom.CONTENT_TYPE_LATEST
