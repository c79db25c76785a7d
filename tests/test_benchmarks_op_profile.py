"""benchmarks/op_profile.py: per-XLA-op times of a jitted call from a jax.profiler trace."""
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
