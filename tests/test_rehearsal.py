"""Rehearsal of the README's "The paper's experiments" table: every row's command runs as written.

The test reads README.md (it hard-codes no command): the convert commands of "Converting the released
checkpoints" and every `python -m b4b_jax.main ...` command of the experiment table, in table order. In
a fresh directory standing for the repository root (configs/ linked in) it builds what a researcher
would have:

  * checkpoints/checkpoint_0099.pth.tar and checkpoints/dino_deitsmall16_pretrain_full_checkpoint.pth:
    random PyTorch SimSiam ResNet-50 and DINO ViT-S/16 models in the released files' layouts
    (tests/torch_reference.py), converted by the README's convert commands with only --checkpoint
    pointed at them, so the encoders land where the README says (encoders/...);
  * data/imagenet/{train,val}/<wnid>/*.JPEG: an ImageNet-style class-folder tree (the stealing
    configs' default pool);
  * $TFDS_DATA_DIR: an empty directory, with every TFDS read served by tfds.testing.mock_data.

Each command is parsed by the same absl/ml_collections flags as `python -m b4b_jax.main` and run
through `b4b_jax.main.run_job`, all rows in one child Python process (TFDS mocking is per process, and
one process shares the compiled encoders between rows; a child, so that a crash in it fails this test
instead of killing pytest). What is appended to a command, and nothing else, are size options
(SIZE_OVERRIDES below): fewer queries (24 per account, whatever the budget), epochs, images, probe runs
and overlaps, smaller batches (8: one per virtual device), and the stolen copy's architecture
(`stolen.arch`, an option of the stealing configs: a 1/8-width ResNet-18 instead of a ResNet-50). A row
whose config then equals an earlier row's but for the workdir (the 100k rows) is that run: its workdir
is linked to the earlier one and the commands that read it (its probe) run. Every run must finish and
leave results.json and report.md; stealing runs and probes must record their protocol in both, and the
jobs that scale representations (steal, legit, remap, fuzzing) their rep_scale in results.json, each
as the row's protocol column says.

Runtime: the victims stay what the convert commands wrote, a ResNet-50 and a ViT-S/16 at their
manifests' 224 px (no config exposes another input size), and compiling them and the stolen models
dominates; XLA's fast-compile mode cuts that. Measured alone from a fresh clone under load: 19 min;
with eight jobs beside it (load average 20-29): 33 min (46 s converting, 130-210 s per stealing run,
10-36 s per probe, legit 150-290 s, remap 436 s); it prints its per-row times. It is marked `slow`
(`-m "not slow"` skips it by hand); .ci/run runs every test, this one included.
"""
import json
import os
import re
import shlex
import subprocess
import sys
import time

from absl import flags
from ml_collections import config_flags
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from b4b_jax.evaluation import paper_numbers
from b4b_jax.evaluation import report
from b4b_jax.main import run_job
from weight_conversion import convert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
TABLE_SECTION = "## The paper's experiments"
CONVERT_SECTION = "## Converting the released checkpoints"
MAIN = ["python", "-m", "b4b_jax.main"]
CONVERT = ["python", "-m", "weight_conversion.convert"]
# The generated checkpoints' writers (tests/torch_reference.py), by the file name the README's convert
# commands name. Imported where used: the rehearsal's child process must not load torch.
CHECKPOINT_WRITERS = {"checkpoint_0099.pth.tar": "write_simsiam_checkpoint",
                      "dino_deitsmall16_pretrain_full_checkpoint.pth": "write_dino_checkpoint"}
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 6, 8, 2
MOCK_EXAMPLES = 16          # every mocked TFDS split
BATCH = 8                   # one image per virtual device
QUERIES_PER_ACCOUNT = 24    # every account, whatever its budget (so a 100k row equals its 50k row)
# Per job: config path -> value (a callable gets the parsed config). Only sizes; a path the config
# lacks fails the test (the README or a config changed: update this table).
SIZE_OVERRIDES = {
    "steal": {
        "attack.num_queries": lambda c: QUERIES_PER_ACCOUNT * c.attack.num_accounts,
        "attack.num_queries_mapping": 16,
        "attack.query_batch_size": BATCH,
        "attack.mapper.epochs": 2,
        "attack.mapper.batch_size": BATCH,
        "data.per_class": TRAIN_PER_CLASS,
        "eval.limit": 8,
        "eval.batch_size": BATCH,
        "train.epochs": 1,
        "train.batch_size": BATCH,
        "stolen.arch": "resnet18_w0.125",
    },
    "probe": {"source.train_limit": 16, "source.test_limit": 8, "source.batch_size": BATCH,
              "probe.epochs": 2, "probe.seeds": (0,)},
    # The original's image-level probe of a stolen copy (its head trains on image views at 32 px here).
    "probe:paper": {"source.train_limit": 16, "source.test_limit": 8, "source.batch_size": BATCH,
                    "probe.epochs": 2, "probe.batch_size": BATCH, "probe.embed_batch_size": BATCH,
                    "probe.image_size": 32},
    "probe:embedding": {"source.train_limit": 16, "source.test_limit": 8, "source.batch_size": BATCH,
                        "probe.epochs": 2, "probe.seeds": (0,)},
    "legit": {"source.train_limit": 16, "source.test_limit": 8, "source.batch_size": BATCH,
              "query_batch_size": BATCH, "probe.epochs": 2, "probe.seeds": (0,)},
    "remap": {"source.train_limit": 16, "source.test_limit": 8, "source.batch_size": BATCH,
              "query_batch_size": BATCH, "overlaps": (0, 8, 16), "probe.epochs": 2},
    "coverage": {"source.batch_size": BATCH, "query_batch_size": BATCH, "report_at": (8, 16),
                 **{f"query_sets[{i}].num_queries": 16 for i in range(6)}},
    "fuzzing": {"source.train_limit": 16, "source.test_limit": 8, "source.batch_size": BATCH,
                "probe.seeds": (0,)},
    "embeddings": {"source.train_limit": 16, "source.test_limit": 8, "source.batch_size": BATCH},
}
PROTOCOL_JOBS = ("steal", "probe")   # jobs whose results must say which protocol ran
REP_SCALE_JOBS = ("steal", "legit", "remap", "fuzzing")   # and the representation scale they used


# --------------------------------------------------------------------------------------------------
# Reading the README
# --------------------------------------------------------------------------------------------------
def _section(text: str, title: str) -> str:
  start = text.index(title)
  end = text.find("\n## ", start + len(title))
  return text[start:] if end < 0 else text[start:end]


def _cells(line: str):
  return [c.strip() for c in line.strip().strip("|").split("|")]


def readme_table():
  """[{column: cell}] of the experiment table, and each row's commands (`python -m b4b_jax.main ...`
  in backticks, in order)."""
  lines = [l for l in _section(open(README).read(), TABLE_SECTION).splitlines() if l.startswith("|")]
  header = [h.lower() for h in _cells(lines[0])]
  rows = []
  for line in lines[2:]:
    # A `|` inside a command would split the cell: the table's commands must not pipe.
    row = dict(zip(header, _cells(line)))
    row["commands"] = [c for c in re.findall(r"`([^`]+)`", line) if c.startswith(" ".join(MAIN))]
    rows.append(row)
  return header, rows


def readme_convert_commands():
  block = _section(open(README).read(), CONVERT_SECTION)
  return [l.strip() for l in block.splitlines() if l.strip().startswith(" ".join(CONVERT))]


def parse_main_command(command: str, extra=()):
  """(config, workdir) exactly as `python -m b4b_jax.main` would parse `command` (+ `extra` flags)."""
  argv = shlex.split(os.path.expandvars(command))
  assert argv[:3] == MAIN, command
  argv = ["b4b_jax.main"] + argv[3:] + list(extra)
  values = flags.FlagValues()
  # sys_argv: config_flags finds the --config.* overrides in it when the flag is defined.
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  values(argv)
  assert values.workdir, f"no --workdir in {command}"
  return values.config, values.workdir


def _get(config, path):
  for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
    config = config[int(part[1:-1])] if part.startswith("[") else config[part]
  return config


def _kind(config):
  """SIZE_OVERRIDES' key: the job, and for a probe its protocol (their probe settings differ)."""
  if config.job == "probe" and "protocol" in config:
    return f"probe:{config.protocol}"
  return config.job


def size_flags(config):
  """The size options appended to a command of `config.job`."""
  out = []
  for path, value in SIZE_OVERRIDES[_kind(config)].items():
    _get(config, path)  # KeyError / IndexError: the config no longer has this field
    value = value(config) if callable(value) else value
    out.append(f"--config.{path}={value}")
  return out


# --------------------------------------------------------------------------------------------------
# What a researcher has before running the table
# --------------------------------------------------------------------------------------------------
def _write_imagenet_tree(root):
  rng = np.random.default_rng(0)
  for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
    for c in range(CLASSES):
      d = os.path.join(root, split, f"n{c:08d}")
      os.makedirs(d)
      for i in range(n):
        pixels = rng.integers(0, 256, (48 + 8 * (i % 3), 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(d, f"n{c:08d}_{i}.JPEG"), quality=90)


@pytest.fixture(scope="module")
def researcher(tmp_path_factory):
  """A working directory with the converted victims (by the README's commands), ImageNet class folders
  and a TFDS data_dir; returns it with the convert runtime."""
  root = tmp_path_factory.mktemp("rehearsal")
  # The commands run from the repository root; a fresh directory with the repository's configs/ in it
  # stands for that root, so what the commands write (encoders/, workdirs/) stays out of the checkout.
  os.symlink(os.path.join(REPO, "configs"), os.path.join(root, "configs"))
  cwd = os.getcwd()
  os.chdir(root)
  try:
    start = time.time()
    commands = readme_convert_commands()
    assert commands, "README has no convert commands"
    for command in commands:
      argv = shlex.split(command)[3:]
      name = os.path.basename(argv[argv.index("--checkpoint") + 1])
      assert name in CHECKPOINT_WRITERS, f"no generator for the README's checkpoint {name}"
      path = os.path.join(root, "checkpoints", name)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      from tests import torch_reference  # pylint: disable=g-import-not-at-top
      getattr(torch_reference, CHECKPOINT_WRITERS[name])(path)
      argv[argv.index("--checkpoint") + 1] = path   # the only change to the command
      assert convert.main(argv) == 0, command
    _write_imagenet_tree(os.path.join(root, "data", "imagenet"))
    os.makedirs(os.path.join(root, "tfds"))
    yield {"root": root, "convert_s": time.time() - start}
  finally:
    os.chdir(cwd)


# --------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------
def test_table_has_every_column_and_a_command_per_row():
  header, rows = readme_table()
  for column in ("experiment", "command", "protocol"):
    assert column in header, header
  assert len(rows) >= 8
  for row in rows:
    assert row["commands"], f"row without a `python -m b4b_jax.main` command: {row['experiment']}"
    assert row["protocol"], f"row without a protocol: {row['experiment']}"
  assert "docs/experiments.md" in _section(open(README).read(), TABLE_SECTION)


def _find_key(tree, key):
  if isinstance(tree, dict):
    if key in tree:
      return tree[key]
    for v in tree.values():
      found = _find_key(v, key)
      if found is not None:
        return found
  return None


def test_the_papers_inconsistent_svhn_cell_is_shown_with_a_note():
  # The undefended 50K attack is one run in Tables 1-6; its SVHN cell reads 63.1 in Tables 1 and 6
  # and 62.1 in Tables 2-5. Each table keeps its printed number, and the report says why they differ.
  svhn = {t: [r for r in paper_numbers.TABLES[t]["rows"]
              if (r["user"], r["defense"], r["queries"]) == ("ATTACK", "NONE", "50K")][0]
          for t in ("table1", "table2", "table3", "table4", "table5", "table6")}
  assert {t: r["values"]["svhn"][0] for t, r in svhn.items()} == {
      "table1": 63.1, "table2": 62.1, "table3": 62.1, "table4": 62.1, "table5": 62.1, "table6": 63.1}
  for table in svhn:
    md = report.table1([], paper_table=table)["markdown"]
    assert "62.1 (Tables 2-5)" in md, table
  assert "62.1" in _section(open(README).read(), TABLE_SECTION)  # the README's Table 1 cell says it


def _same_run(config, done):
  """The workdir of an earlier row whose config equals `config` but for the workdir, or None."""
  for other_config, other_workdir in done:
    if other_config == config:
      return other_workdir
  return None


# The rows run in a child Python (one process for all rows, so they share compiled encoders), not in
# pytest's own: a full suite's pytest holds several GB and years of JAX state, and twice (2 Dec 2026,
# once on a quiet CI machine) XLA segfaulted while compiling a row there, which killed the whole suite
# and its report. In a child, a crash is this test's failure, with the child's log.
CHILD = ("import sys; sys.modules.setdefault('triton', None); "  # as in conftest (TF before torch)
         "from tests import test_rehearsal; test_rehearsal.rehearse(sys.argv[1], sys.argv[2])")
CHILD_TIMEOUT_S = 3600


@pytest.mark.slow
def test_every_row_runs_as_written(researcher, tmp_path):
  out, log = str(tmp_path / "rehearsal.json"), str(tmp_path / "rehearsal.log")
  env = dict(os.environ, TFDS_DATA_DIR=os.path.join(researcher["root"], "tfds"), JAX_PLATFORMS="cpu",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1",  # XLA's fast compile: tiny shapes, compiles dominate
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  with open(log, "wb") as f:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(researcher["root"]), out], cwd=REPO,
                          env=env, stdout=f, stderr=subprocess.STDOUT, timeout=CHILD_TIMEOUT_S)
  lines = open(log, errors="replace").read().splitlines()
  print("\n".join(l for l in lines if l.startswith("rehearsal:")))
  assert proc.returncode == 0, (f"the rehearsal process exited with {proc.returncode}; its log ends:\n"
                                + "\n".join(lines[-60:]))
  result = json.load(open(out))
  timings = [("convert (2 checkpoints written + converted)", researcher["convert_s"])] + result["timings"]
  for name, seconds in timings:
    print(f"{seconds:7.1f} s  {name}")
  print(f"{sum(s for _, s in timings):7.1f} s  total")
  assert not result["problems"], "\n".join(result["problems"])


def rehearse(root: str, out_path: str) -> None:
  """Runs every README row's command (with the size options) in this process, from `root` (the
  researcher's directory); writes {"timings": [[name, seconds]], "problems": [...]} to `out_path`."""
  os.chdir(root)
  _, rows = readme_table()
  timings, problems, done = [], [], []
  for row in rows:
    for command in row["commands"]:
      config, _ = parse_main_command(command)
      assert _kind(config) in SIZE_OVERRIDES, f"no size options for {_kind(config)!r}: {command}"
      config, workdir = parse_main_command(command, size_flags(config))
      same = _same_run(config, done)
      if same is not None:
        # After the size options this row is an earlier row's run (the 100k rows are the 50k rows
        # with more queries): its workdir stands for this one, and the commands that read it run.
        os.symlink(os.path.abspath(same), os.path.abspath(workdir))
        timings.append((f"{row['experiment']}: {config.job} = {same}", 0.0))
        continue
      done.append((config, workdir))
      start = time.time()
      with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        run_job(config, os.path.abspath(workdir))
      timings.append((f"{row['experiment']}: {config.job}", time.time() - start))
      print(f"rehearsal: {timings[-1][1]:.1f} s  {timings[-1][0]}", flush=True)
      problems += _check_outputs(config.job, workdir, row["protocol"])
  with open(out_path, "w") as f:
    json.dump({"timings": timings, "problems": problems}, f)


def _check_outputs(job, workdir, protocol_cell):
  """What is missing from a finished run's outputs, or contradicts the README row's protocol cell
  (every row runs; the problems are listed at the end)."""
  results = json.load(open(os.path.join(workdir, "results.json")))
  report = open(os.path.join(workdir, "report.md")).read()
  if not report.strip():
    return [f"{workdir}/report.md is empty"]
  problems = []
  if job in REP_SCALE_JOBS:
    scale = _find_key(results, "rep_scale")
    if scale is None:
      problems.append(f"{workdir}/results.json records no rep_scale")
    elif not re.search(rf"rep_scale {float(scale):g}\b", protocol_cell):
      problems.append(f"{workdir} ran rep_scale {scale:g}; the README row says: {protocol_cell}")
  if job in PROTOCOL_JOBS:
    protocol = _find_key(results, "protocol")
    if not protocol:
      problems.append(f"{workdir}/results.json records no protocol")
    elif f"`{protocol}`" not in report:
      problems.append(f"{workdir}/report.md does not name protocol {protocol}")
    elif f"{job} `{protocol}`" not in protocol_cell:
      problems.append(f"{workdir} ran {job} protocol {protocol}; the README row says: {protocol_cell}")
  return problems
