"""Which part of a split each process reads (multi-host input): contiguous even shares."""
from typing import Optional, Tuple

import jax


def resolve_process(process_index: Optional[int] = None, process_count: Optional[int] = None
                    ) -> Tuple[int, int]:
  """(process_index, process_count), defaulting to this JAX process; validated."""
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got process_index={process_index}, "
                     f"process_count={process_count}")
  return process_index, process_count


def shard_bounds(n: int, process_index: int, process_count: int) -> Tuple[int, int]:
  """[start, stop) of process `process_index`'s contiguous share of n items: shares differ by <= 1 item,
  the first n % process_count processes take one more (tfds.even_splits' rule, so arrays, folders and
  TFDS splits are divided alike)."""
  process_index, process_count = resolve_process(process_index, process_count)
  base, extra = divmod(int(n), process_count)
  start = process_index * base + min(process_index, extra)
  return start, start + base + (process_index < extra)
