"""benchmarks/op_profile.py: per-XLA-op times of a jitted call from a jax.profiler trace."""
import re

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import op_profile


def test_profile_names_each_op_and_separates_loops_from_their_ops():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 64)), jnp.float32)

  def profiled_call(a):  # XLA module "jit_profiled_call"
    return jax.lax.fori_loop(0, 3, lambda i, v: jnp.sin(v) @ a, a)

  def profiled_reference(a):
    return a @ a

  call, reference = jax.jit(profiled_call), jax.jit(profiled_reference)
  hlo = call.lower(x).compile().as_text()
  p = op_profile.profile(lambda: call(x), "jit_profiled_call", lambda: reference(x),
                         "jit_profiled_reference", runs=3, hlo_text=hlo)
  assert p.wall > 0 and p.reference_wall > 0
  assert p.ops and all(sec >= 0 for _, sec, _ in p.ops)
  assert p.containers and all(name.startswith("while") for name in p.containers)
  # The loop is reported, but only its body's ops count in the leaf sum.
  assert p.leaf_seconds() < sum(sec for _, sec, _ in p.ops)
  assert any("sin" in op_name or "dot" in op_name for _, _, op_name in p.ops)
  lines = op_profile.lines(p)
  assert lines[0].lstrip().startswith("wall") and any("loop/conditional" in line for line in lines)


def test_a_call_alone_is_its_own_reference_and_ops_sum_by_kind():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((64, 64)), jnp.float32)

  def profiled_alone(a):  # XLA module "jit_profiled_alone"
    return jnp.tanh(a @ a) @ a + jnp.sin(a)

  call = jax.jit(profiled_alone)
  p = op_profile.profile(lambda: call(x), "jit_profiled_alone", runs=3,
                         hlo_text=call.lower(x).compile().as_text())
  assert p.wall > 0 and p.reference_wall == p.wall
  kinds = op_profile.by_kind(p)
  # Every leaf op is in exactly one kind, named without its ".N" suffix, the largest kind first.
  assert sum(n for _, _, n in kinds) == len(p.ops) - len(p.containers)
  np.testing.assert_allclose(sum(sec for _, sec, _ in kinds), p.leaf_seconds(), rtol=1e-9)
  assert all(not re.search(r"\.\d+$", kind) for kind, _, _ in kinds)
  assert [sec for _, sec, _ in kinds] == sorted((sec for _, sec, _ in kinds), reverse=True)


def test_the_steal_step_benchmark_prints_where_its_step_goes(capsys):
  from benchmarks import steal_step  # pylint: disable=g-import-not-at-top
  steal_step.main(["--tiny", "--profile", "--steps", "2"])
  out = capsys.readouterr().out
  section = out.split("where our resnet18 step's time goes (--profile):\n", 1)[1].splitlines()
  assert section[0].lstrip().startswith("wall ") and "convolutions' to " in section[0]
  assert section[1].lstrip().startswith("by kind: ") and " ms (" in section[1]
  assert any(line.strip().endswith("other ops)") for line in section)
  ratio = float(re.search(r"^resnet18 .*? ([\d.]+) +cpu ", out, re.M).group(1))
  line = re.fullmatch(r"  the convolution ops take ([\d.]+)% of the traced step .* would reach about "
                      r"([\d.]+)x PyTorch \(the measured ([\d.]+)x over that share\).*", section[2])
  assert line, section[2]
  share, bound, measured = (float(v) for v in line.groups())
  assert 0 < share <= 100 and np.isclose(measured, ratio, atol=0.006)
  # Printed at two decimals (the bound), one (the share, in %) and three (the ratio): the bound lies
  # within what their rounding allows (the tiny step's share is a few %, so the share's decimal counts).
  assert share > 0.05
  low = (measured - 5e-4) / ((share + 0.05) / 100) - 5e-3
  high = (measured + 5e-4) / ((share - 0.05) / 100) + 5e-3
  assert low <= bound <= high, (share, bound, measured)


def test_convolution_bound_scales_the_measured_ratio_by_the_convolutions_share():
  from benchmarks import steal_step  # pylint: disable=g-import-not-at-top
  # A 1.4 s traced step whose events sum to 0.2 s, 0.02 s of them the convolutions' launches: the
  # convolutions' share is (1.4 - 0.18) / 1.4; at 0.87x PyTorch measured, free other ops give 1.0x.
  share, bound = steal_step.convolution_bound(wall=1.4, leaf=0.2, conv_events=0.02, ratio=0.87)
  np.testing.assert_allclose([share, bound], [1.22 / 1.4, 0.87 * 1.4 / 1.22])
  share, bound = steal_step.convolution_bound(wall=1.0, leaf=0.5, conv_events=0.0, ratio=0.25)
  np.testing.assert_allclose([share, bound], [0.5, 0.5])
  # Events that overlap can sum past the wall: then nothing is bounded.
  assert steal_step.convolution_bound(wall=1.0, leaf=1.5, conv_events=0.0, ratio=0.5) == (0.0, np.inf)
