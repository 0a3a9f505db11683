"""examples/jax_mlp.py runs (few steps) and the regularized MLP ends more orthogonal than the plain one."""

import importlib.util
import pathlib

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")
pytest.importorskip("equinox")


@pytest.mark.long
def test_example_becomes_more_orthogonal():
    path = pathlib.Path(__file__).parent.parent / "examples" / "jax_mlp.py"
    spec = importlib.util.spec_from_file_location("jax_mlp", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--steps", "60"])
    assert out["ortho_l1"]["penalty"] < 0.5 * out["plain"]["penalty"]
    assert sum(out["ortho_l1"]["defects"]) < sum(out["plain"]["defects"])
