"""The one place that talks to orbax: step checkpoints of a pytree plus a JSON metadata blob.

Checkpoints are written atomically by orbax (a step directory appears only when complete), so killing a
run mid-save leaves the previous step intact; resuming restores into an abstract tree so arrays come
back with the shardings of the running job.
"""
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


def abstract_like(tree):
  """Shape/dtype/sharding skeleton of `tree` for restoring into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
  """Step checkpoints under `directory` (e.g. workdir/checkpoints)."""

  def __init__(self, directory: str, *, max_to_keep: Optional[int] = 2, async_save: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def save(self, step: int, state: Any, meta: Optional[dict] = None, *, force: bool = True) -> bool:
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta or {})), force=force)

  def restore(self, abstract_state: Any, step: Optional[int] = None):
    """Returns (state, meta) of `step` (default: latest). Raises FileNotFoundError if none exists."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"] or {})

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def save_pytree(directory: str, tree: Any, meta: Optional[dict] = None) -> None:
  """One-shot save of a single pytree (e.g. converted encoder params) as step 0 of `directory`."""
  ckpt = Checkpointer(directory, max_to_keep=None)
  ckpt.save(0, tree, meta)
  ckpt.close()


def load_pytree(directory: str, abstract_tree: Any = None, *, step: Optional[int] = None):
  """Loads what save_pytree wrote (`step`, default the latest). Without `abstract_tree`, arrays come
  back as saved (host/default)."""
  ckpt = Checkpointer(directory, max_to_keep=None)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {directory}")
    if abstract_tree is None:
      restored = ckpt._manager.restore(  # pylint: disable=protected-access
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
      return restored["state"], dict(restored["meta"] or {})
    return ckpt.restore(abstract_tree, step)
  finally:
    ckpt.close()
