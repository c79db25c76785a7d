"""The one place that talks to orbax: step checkpoints of a pytree plus a JSON metadata blob.

Checkpoints are written atomically by orbax (a step directory appears only when complete), so killing a
run mid-save leaves the previous step intact; resuming restores into an abstract tree so arrays come
back with the shardings of the running job. Leftover `<step>.orbax-checkpoint-tmp-*` directories of a
killed save are removed on open (orbax `cleanup_tmp_directories`).

Deleting old steps (max_to_keep) is made atomic too: orbax renames a step it drops into
`<directory>/.deleted/` (orbax `todelete_subdir`) and we empty that folder after each save and on
open, so a kill during the (slow, non-atomic) recursive delete never leaves a half-deleted step that
orbax still lists. Half-deleted steps left by older versions are found on open: an incomplete step
(a marker file missing or a directory emptied) that is *not* the latest is a leftover of an
interrupted deletion (orbax only deletes older steps) and is removed with a warning; an incomplete
*latest* step is damage, not a leftover, and is left for `restore` to report.

Multi-process runs. A `Checkpointer` is collective by default: every process constructs it and calls
save/restore in the same order (orbax synchronises them; each process writes and reads its shards of
global arrays, process 0 the metadata and host (numpy) arrays) -- the training checkpoints. One-shot
host trees (`save_pytree`: an encoder's weights, the attack's responses) are written by one process
alone (`process_local=True`: no barriers, so process 0 can write while the others wait elsewhere);
`load_pytree` reads process-locally on any process. Only process 0 deletes anything (old steps, trash,
leftovers of killed saves), so a process that reads never removes what another is writing.
"""
import os
import shutil
from typing import Any, List, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

from b4b_jax.utils import files

TRASH = ".deleted"
# Files every complete step of ours holds (orbax 0.12: step metadata, PyTree and JSON item metadata).
_STEP_MARKERS = ("_CHECKPOINT_METADATA", os.path.join("state", "_METADATA"),
                 os.path.join("meta", "metadata"))


def abstract_like(tree):
  """Shape/dtype/sharding skeleton of `tree` for restoring into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
  """Step checkpoints under `directory` (e.g. workdir/checkpoints)."""

  def __init__(self, directory: str, *, max_to_keep: Optional[int] = 2, async_save: bool = False,
               process_local: bool = False):
    """process_local: this process alone saves/restores here (no cross-process barriers); default:
    every process of the run takes part in every call (see the module docstring)."""
    self.directory = os.path.abspath(directory)
    files.check_output_dir(self.directory, "checkpoint directory", must_be_writable=False)
    housekeeper = jax.process_index() == 0
    if os.path.isdir(self.directory) and housekeeper:
      _empty_trash(self.directory)
      _remove_incomplete_old_steps(self.directory)
    multiprocessing, create = ocp.options.MultiprocessingOptions(), True
    if process_local and jax.process_count() > 1:
      me = jax.process_index()
      multiprocessing = ocp.options.MultiprocessingOptions(
          primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"local{me}")
      files.make_dir(self.directory)  # orbax's create=True would sync with the other processes
      create = False
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                           enable_async_checkpointing=async_save,
                                           todelete_subdir=TRASH, cleanup_tmp_directories=housekeeper,
                                           multiprocessing_options=multiprocessing)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def save(self, step: int, state: Any, meta: Optional[dict] = None, *, force: bool = True) -> bool:
    saved = self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta or {})), force=force)
    if not self._manager.is_saving_in_progress():
      self._empty_trash()
    return saved

  def _empty_trash(self) -> None:
    if jax.process_index() == 0:
      _empty_trash(self.directory)

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
    self._empty_trash()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
    self._empty_trash()


def _empty_trash(directory: str) -> None:
  trash = os.path.join(directory, TRASH)
  if os.path.isdir(trash):
    shutil.rmtree(trash, ignore_errors=True)


def _missing_parts(step_dir: str) -> List[str]:
  missing = [m for m in _STEP_MARKERS if not os.path.isfile(os.path.join(step_dir, m))]
  for root, dirs, names in os.walk(step_dir):
    if not dirs and not names:  # rmtree empties a directory before removing it
      missing.append(os.path.relpath(root, step_dir) + "/ (empty)")
  return missing


def _remove_incomplete_old_steps(directory: str) -> None:
  steps = sorted(int(n) for n in os.listdir(directory)
                 if n.isdigit() and os.path.isdir(os.path.join(directory, n)))
  for step in steps[:-1]:
    step_dir = os.path.join(directory, str(step))
    missing = _missing_parts(step_dir)
    if not missing:
      continue
    logging.warning("checkpoint step %d under %s is incomplete (missing %s): a deletion of this old "
                    "step was interrupted; removing it (restores use the later steps %s)", step,
                    directory, ", ".join(missing[:4]), steps[steps.index(step) + 1:])
    try:
      trash = os.path.join(directory, TRASH)
      os.makedirs(trash, exist_ok=True)
      aside = os.path.join(trash, f"incomplete-{step}")
      shutil.rmtree(aside, ignore_errors=True)
      os.rename(step_dir, aside)  # out of the step listing in one step, then deleted
      shutil.rmtree(aside, ignore_errors=True)
    except OSError as e:  # e.g. a read-only workdir: the latest step still restores
      logging.warning("could not remove incomplete checkpoint step %s: %s", step_dir, e)


def save_pytree(directory: str, tree: Any, meta: Optional[dict] = None) -> None:
  """One-shot save of a single host pytree (e.g. converted encoder params) as step 0 of `directory`, by
  this process alone: in multi-process runs call it from one process (process 0)."""
  ckpt = Checkpointer(directory, max_to_keep=None, process_local=True)
  ckpt.save(0, tree, meta)
  ckpt.close()


def load_pytree(directory: str, abstract_tree: Any = None, *, step: Optional[int] = None):
  """Loads what save_pytree wrote (`step`, default the latest). Without `abstract_tree`, arrays come
  back as saved (host/default).

  Reads only: a missing `directory` is a FileNotFoundError (it is not created), and a read-only one
  works. Process-local: any process reads by itself.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint under {directory} (no such directory)")
  ckpt = Checkpointer(directory, max_to_keep=None, process_local=True)
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
