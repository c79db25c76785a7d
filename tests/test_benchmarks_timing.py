"""benchmarks/common.timed_in_turns (every timed call follows an untimed call of the same function) and
benchmarks/conv_repro.py (its per-pass split: the input and the kernel gradient apart)."""
from benchmarks import common
from benchmarks import conv_repro


def test_timed_in_turns_times_each_call_right_after_a_call_of_its_own(monkeypatch):
  clock = [0.0]
  log = []
  cost = {"ours": 1.0, "theirs": 3.0}

  def call(name):
    def fn():
      log.append(name)
      clock[0] += cost[name]
    return fn

  def perf_counter():
    log.append("clock")
    return clock[0]

  monkeypatch.setattr(common.time, "perf_counter", perf_counter)
  times = common.timed_in_turns({"ours": call("ours"), "theirs": call("theirs")}, turns=3,
                                calls_per_turn=2)
  assert times == {"ours": [1.0] * 6, "theirs": [3.0] * 6}
  # Per turn and function: one untimed call, then each timed call between two clock readings, so every
  # timed call comes right after a call of the same function, never after the other's.
  one_turn = ["ours", "clock", "ours", "clock", "clock", "ours", "clock",
              "theirs", "clock", "theirs", "clock", "clock", "theirs", "clock"]
  assert log == one_turn * 3


def test_conv_repro_times_the_two_gradients_apart(capsys):
  rows = conv_repro.main(["--cases", "3x3_512_4px_b64", "--iters", "1"])
  names = [r.benchmark for r in rows]
  assert names == ["conv_repro: 3x3_512_4px_b64 fwd+bwd", "conv_repro: 3x3_512_4px_b64 fwd+bwd, layers.conv",
                   "conv_repro: 3x3_512_4px_b64 input grad", "conv_repro: 3x3_512_4px_b64 kernel grad"]
  assert all(r.ratio > 0 for r in rows)
  out = capsys.readouterr().out
  assert "B4B_HOST_MEMORY=" in out and "input gradient ours" in out and "kernel gradient ours" in out
