"""Progress lines for long runs: stage, step, rate and ETA, printed at most every few seconds."""
import datetime
import time
from typing import Callable, Optional

from absl import logging


def _format_eta(seconds: float) -> str:
  if seconds != seconds or seconds == float("inf"):  # NaN or inf
    return "?"
  return str(datetime.timedelta(seconds=int(seconds)))


class Progress:
  """Reports `[stage] step i/N (p%) r it/s ETA h:mm:ss key=value ...`.

  Printing is rate-limited (`every_seconds`), except for the first and the final step, so tight loops
  pay almost nothing. `print_fn` defaults to absl's logging.info; tests pass a list's append.
  """

  def __init__(self, stage: str, total: int, *, unit: str = "step", every_seconds: float = 5.0,
               print_fn: Optional[Callable[[str], None]] = None, start_step: int = 0):
    self.stage = stage
    self.total = max(int(total), 0)
    self.unit = unit
    self.every_seconds = every_seconds
    self.print_fn = print_fn or logging.info
    self._start_step = start_step
    self._start_time = time.perf_counter()
    self._last_print = -float("inf")
    self.last_line = ""

  def rate(self, step: int) -> float:
    elapsed = time.perf_counter() - self._start_time
    done = step - self._start_step
    return done / elapsed if elapsed > 0 and done > 0 else 0.0

  def update(self, step: int, force: bool = False, **extra) -> None:
    now = time.perf_counter()
    is_edge = step in (self._start_step + 1, self.total)
    if not (force or is_edge or now - self._last_print >= self.every_seconds):
      return
    self._last_print = now
    rate = self.rate(step)
    fields = " ".join(f"{k}={_fmt(v)}" for k, v in extra.items())
    if self.total and step <= self.total:
      remaining = (self.total - step) / rate if rate > 0 else float("nan")
      done = f"{step}/{self.total} ({100.0 * step / self.total:.1f}%)"
    else:  # total unknown (0: e.g. a filtered tf.data stream) or overrun: no percentage, no ETA
      remaining, done = float("nan"), f"{step}" + (f"/{self.total}" if self.total else " (total unknown)")
    self.last_line = (f"[{self.stage}] {self.unit} {done} "
                      f"{rate:.2f} {self.unit}/s ETA {_format_eta(remaining)} {fields}").rstrip()
    self.print_fn(self.last_line)


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)
