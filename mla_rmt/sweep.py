"""Sweeps declared next to a config: a list of trials, each a dict of dotted-field overrides.

A config file may define `get_sweep(arg) -> list[dict]` beside `get_config(arg)`; build the
list with `product` and `+`:

    def get_sweep(arg):
        return sweep.product({"model.attention.kind": ["mha", "mla_decoupled"],
                              "model.attention.rope_fraction": [0.25, 0.5]}) + \
               [{"model.attention.kind": "mha", "model.attention.rope_fraction": 0.0}]
"""
import importlib.util
import itertools
import pathlib
import re

import ml_collections

from mla_rmt import dotted


def product(axes: dict[str, list]) -> list[dict]:
    """Every combination of the axes' values, the last axis varying fastest."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


def _format_value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def trial_name(overrides: dict) -> str:
    """A directory name from the swept values, e.g. 'kind=mla_decoupled,rope_fraction=0.5'."""
    if not overrides:
        return "trial"
    parts = [f"{key.rsplit('.', 1)[-1]}={_format_value(value)}" for key, value in overrides.items()]
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", ",".join(parts))


def apply(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """A copy of config with the dotted fields set; an unknown field is an error naming it."""
    config = ml_collections.ConfigDict(config.to_dict())   # unlocked deep copy
    for key, value in overrides.items():
        if isinstance(dotted.get(config, key), float) and isinstance(value, int):
            value = float(value)        # ConfigDict keeps a field's type
        dotted.set(config, key, value)
    return config


def _module(path: str):
    spec = importlib.util.spec_from_file_location("_mla_rmt_sweep_config", pathlib.Path(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(config_spec: str) -> ml_collections.ConfigDict:
    """get_config() of the config file `path[:arg]`, as --config=path[:arg] gives it."""
    path, _, arg = config_spec.partition(":")
    module = _module(path)
    return module.get_config(arg) if arg else module.get_config()


def load(config_spec: str) -> list[dict] | None:
    """The trials that the config file `path[:arg]` declares, or None if it declares no sweep."""
    path, _, arg = config_spec.partition(":")
    module = _module(path)
    if not hasattr(module, "get_sweep"):
        return None
    return module.get_sweep(arg) if arg else module.get_sweep()


def select(spec: str, count: int) -> list[int]:
    """Trial indices of a spec such as '3', '0-5' or '0,4,8-9' ('' = all of the `count`)."""
    if not spec:
        return list(range(count))
    indices = []
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        try:
            indices += range(int(first), int(last or first) + 1)
        except ValueError:
            raise ValueError(f"{part!r} is not a trial index or range (e.g. '3', '0-5', '0,4,8-9')") from None
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise ValueError(f"{bad} not in the sweep's trials 0..{count - 1}")
    return list(dict.fromkeys(indices))
