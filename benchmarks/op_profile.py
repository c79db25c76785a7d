"""Where a jitted call's time goes: per-HLO-op times from a jax.profiler trace, against a reference call.

  profile(call, module, reference, reference_module, runs) -> Profile
  profile(call, module, runs=runs) -> Profile        # no reference: shares are of the call's own wall
  by_kind(profile) -> [(kind, seconds, ops)]         # leaf ops summed by kind (name without ".N")

`call` and `reference` are zero-argument callables that run one jitted computation each (XLA module
names `module` and `reference_module`, e.g. "jit_defense_step"); they are traced alternately `runs`
times, so load from other processes hits both alike. XLA's CPU runtime records one trace event per
executed op (thunk), with the module and a run id: per run, an op's time is the sum of its events (an
op inside a loop runs once per iteration), and the profile keeps each op's minimum over runs, the
least-disturbed figure. Ops that only contain others (while loops, conditionals) are reported but
not added into the sum of leaf ops. `wall` is the least span (first op start to last op end) of a run.

The trace adds a little overhead per op, and ops that XLA runs concurrently overlap in `wall`, so the
leaf sum can exceed it; shares of the reference's wall time are the comparable figure.
"""
import collections
import dataclasses
import glob
import gzip
import json
import re
import tempfile
from typing import Callable, Dict, List, Optional, Tuple

import jax

_CONTAINER = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*? (?:while|conditional)\(", re.M)
_OP_NAME = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*?metadata=\{op_name=\"([^\"]*)\"", re.M)


@dataclasses.dataclass
class Profile:
  wall: float  # seconds, least span of one run of the call
  reference_wall: float  # seconds, the same for the reference
  ops: List[Tuple[str, float, str]]  # (op, least seconds per run, JAX op_name), slowest first
  containers: frozenset  # ops that contain others (not in the leaf sum)

  def leaf_seconds(self) -> float:
    return sum(sec for name, sec, _ in self.ops if name not in self.containers)


def _runs_of(events, module: str) -> Dict[str, Dict[str, object]]:
  """run id -> {"ops": {op: summed seconds}, "start": s, "end": s} for one module's op events."""
  runs: Dict[str, Dict[str, object]] = {}
  for e in events:
    args = e.get("args") or {}
    if e.get("ph") != "X" or args.get("hlo_module") != module or "hlo_op" not in args:
      continue
    run = runs.setdefault(args.get("run_id", ""), {"ops": collections.Counter(), "start": float("inf"),
                                                   "end": 0.0})
    run["ops"][args["hlo_op"]] += e["dur"] * 1e-6
    run["start"] = min(run["start"], e["ts"] * 1e-6)
    run["end"] = max(run["end"], (e["ts"] + e["dur"]) * 1e-6)
  return runs


def profile(call: Callable[[], object], module: str, reference: Optional[Callable[[], object]] = None,
            reference_module: str = "", runs: int = 10, hlo_text: str = "") -> Profile:
  """Traces `call` and `reference` alternately `runs` times (both warmed up first). hlo_text: the
  compiled module's text (`jitted.lower(...).compile().as_text()`), for op names and containers.
  Without a reference, only `call` is traced and its own least wall is the reference."""
  calls = [call] if reference is None else [call, reference]
  for fn in calls:
    jax.block_until_ready(fn())
  with tempfile.TemporaryDirectory() as logdir:
    jax.profiler.start_trace(logdir, create_perfetto_trace=True)
    try:
      for _ in range(runs):
        for fn in calls:
          jax.block_until_ready(fn())
    finally:
      jax.profiler.stop_trace()
    paths = glob.glob(f"{logdir}/**/*.trace.json.gz", recursive=True)
    if not paths:
      raise RuntimeError("jax.profiler wrote no perfetto trace")
    with gzip.open(paths[0]) as f:
      events = json.load(f)["traceEvents"]
  mine = _runs_of(events, module)
  ref = mine if reference is None else _runs_of(events, reference_module)
  if not mine or not ref:
    raise RuntimeError(f"no op events of {module!r} / {reference_module!r} in the trace (modules seen: "
                       f"{sorted({(e.get('args') or {}).get('hlo_module') for e in events} - {None})})")
  least: Dict[str, float] = {}
  for run in mine.values():
    for op, sec in run["ops"].items():
      least[op] = min(least.get(op, float("inf")), sec)
  names = dict(_OP_NAME.findall(hlo_text))
  ops = sorted(((op, sec, names.get(op, "")) for op, sec in least.items()), key=lambda r: -r[1])
  return Profile(wall=min(r["end"] - r["start"] for r in mine.values()),
                 reference_wall=min(r["end"] - r["start"] for r in ref.values()), ops=ops,
                 containers=frozenset(_CONTAINER.findall(hlo_text)))


def by_kind(p: Profile) -> List[Tuple[str, float, int]]:
  """Leaf ops summed by kind, the op's name without its ".N" suffix (XLA names each fusion after its
  root ops: "transpose_copy_fusion.61" is of kind "transpose_copy_fusion"): (kind, seconds, number of
  ops), the largest first."""
  seconds, counts = collections.Counter(), collections.Counter()
  for op, sec, _ in p.ops:
    if op not in p.containers:
      kind = re.sub(r"\.\d+$", "", op)
      seconds[kind] += sec
      counts[kind] += 1
  return [(kind, sec, counts[kind]) for kind, sec in seconds.most_common()]


def lines(p: Profile, top: int = 12, indent: str = "      ") -> List[str]:
  """The profile as printable lines: wall and leaf sum against the reference, then the top ops."""
  ref = p.reference_wall
  out = [f"{indent}wall {p.wall / ref:.2f}x reference ({1e3 * p.wall:.2f} ms, reference "
         f"{1e3 * ref:.2f} ms); leaf ops sum {p.leaf_seconds() / ref:.2f}x"]
  shown = [r for r in p.ops if r[0] not in p.containers][:top]
  for op, sec, op_name in shown:
    out.append(f"{indent}  {sec / ref:5.3f}x  {op:34s} {op_name.split('/', 1)[-1][:60]}")
  rest = p.leaf_seconds() - sum(sec for _, sec, _ in shown)
  out.append(f"{indent}  {rest / ref:5.3f}x  ({len(p.ops) - len(p.containers) - len(shown)} other ops)")
  for op, sec, op_name in p.ops:
    if op in p.containers:
      out.append(f"{indent}  [{sec / ref:5.3f}x  {op}: a loop/conditional, its ops counted above]")
  return out
