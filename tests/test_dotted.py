"""Dotted config fields read and written in a ConfigDict and a nested dict; a missing field is
an error naming it."""
import ml_collections
import numpy as np
import pytest

from mla_rmt import dotted, presets, sweep


def _random_tree(rng, depth=3):
    """A nested dict of fresh random keys, and {dotted path: leaf value}."""
    tree, leaves = {}, {}
    for i in range(rng.integers(2, 5)):
        key = f"k{rng.integers(1 << 30)}_{i}"
        if depth > 1 and rng.random() < 0.6:
            child, child_leaves = _random_tree(rng, depth - 1)
            tree[key] = child
            leaves.update({f"{key}.{path}": v for path, v in child_leaves.items()})
        else:
            tree[key] = leaves[key] = float(rng.normal())
    return tree, leaves


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("as_config", [False, True])
def test_every_leaf_reads_back_and_a_set_changes_that_leaf_alone(seed, as_config):
    rng = np.random.default_rng(seed)
    tree, leaves = _random_tree(rng)
    if as_config:
        tree = ml_collections.ConfigDict(tree)
    for path, value in leaves.items():
        assert dotted.get(tree, path) == value
    path = list(leaves)[rng.integers(len(leaves))]
    dotted.set(tree, path, 12.5)
    assert {p: dotted.get(tree, p) for p in leaves} == {**leaves, path: 12.5}


@pytest.mark.parametrize("as_config", [False, True])
def test_a_missing_field_is_an_error_naming_it(as_config):
    tree = {"model": {"attention": {"kind": "mha"}}, "seed": 0, "name": "abc"}
    if as_config:
        tree = ml_collections.ConfigDict(tree)
    for path, missing in (("model.attention.kindd", "kindd"), ("model.atention.kind", "atention"),
                          ("seed.x", "x"), ("name.a", "a"), ("optim", "optim")):
        with pytest.raises(KeyError, match=rf"{path}.*{missing}"):
            dotted.get(tree, path)
        with pytest.raises(KeyError, match=rf"{path}.*{missing}"):
            dotted.set(tree, path, 1)
        assert dotted.get(tree, path, None) is None
    assert dotted.get(tree, "model.attention.kind") == "mha"


def test_sweep_apply_sets_copies_and_names_an_unknown_field():
    config = presets.base_config()
    before = config.to_json()
    out = sweep.apply(config, {"model.attention.kind": "mla_decoupled", "optim.learning_rate": 1})
    assert out.model.attention.kind == "mla_decoupled"
    assert isinstance(out.optim.learning_rate, float) and out.optim.learning_rate == 1.0
    assert config.to_json() == before                     # the original is untouched
    with pytest.raises(KeyError, match="model.attention.knid"):
        sweep.apply(config, {"model.attention.knid": "mha"})
