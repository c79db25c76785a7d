"""tests/trees.py: the shared result-tree comparison fails where it should."""
import pytest

from tests.trees import assert_trees_match


def test_equal_trees_pass_and_each_kind_of_difference_fails_naming_its_path():
  tree = {"a": [1, 2.0, "x"], "b": {"sigma": 0.5, "n": 3}}
  assert_trees_match({"a": [1, 2.0, "x"], "b": {"sigma": 0.5, "n": 3}}, tree)
  for changed, where in (({"a": [1, 2.0, "y"], "b": {"sigma": 0.5, "n": 3}}, "results.a[2]"),
                         ({"a": [1, 2.0, "x"], "b": {"sigma": 0.5, "n": 4}}, "results.b.n"),
                         ({"a": [1, 2.0], "b": {"sigma": 0.5, "n": 3}}, "results.a"),
                         ({"a": [1, 2.0, "x"], "b": {"sigma": 0.5}}, "results.b"),
                         ({"a": [1, 2.0000001, "x"], "b": {"sigma": 0.5, "n": 3}}, "results.a[1]")):
    with pytest.raises(AssertionError, match=where.replace(".", r"\.").replace("[", r"\[")):
      assert_trees_match(changed, tree)


def test_floats_compare_to_the_tolerance_their_path_gets_and_counts_stay_exact():
  sigma_only = lambda path: (1e-5, 0.0) if "sigma" in path else None  # noqa: E731
  want = {"sigma": 1.0, "loss": 1.0, "n": 3}
  assert_trees_match({"sigma": 1.000001, "loss": 1.0, "n": 3}, want, float_tolerance=sigma_only)
  with pytest.raises(AssertionError, match="sigma"):
    assert_trees_match({"sigma": 1.0001, "loss": 1.0, "n": 3}, want, float_tolerance=sigma_only)
  with pytest.raises(AssertionError, match="loss"):
    assert_trees_match({"sigma": 1.0, "loss": 1.000001, "n": 3}, want, float_tolerance=sigma_only)
  with pytest.raises(AssertionError, match="results.n"):
    assert_trees_match({"sigma": 1.0, "loss": 1.0, "n": 4}, want, float_tolerance=lambda p: (1.0, 1.0))
