"""The TensorBoard tag schema: every tag a run writes is formatted here and parsed back here.

The strings are a file format (event files and exports written before stay readable): see
docs/spectral.md, "Tags". Names (matrices, metrics) hold no '/'.
"""
import re
from typing import NamedTuple

# The swept attention fields every trial row (trial table, HParams entry) carries, swept or not:
# column -> dotted config field.
SWEPT = {"kind": "model.attention.kind", "rope_fraction": "model.attention.rope_fraction",
         "remove_gap": "model.attention.remove_gap"}

HEAD_REDUCTIONS = ("head_mean", "head_max")   # a per-head matrix's value of a layer
OVER_LAYERS = ("mean", "max")                 # a summary over the layers (and heads)

TRAIN_LOSS, TRAIN_GRAD_NORM, TRAIN_LEARNING_RATE = "train/loss", "train/grad_norm", "train/learning_rate"
EVAL_LOSS, EVAL_PERPLEXITY = "eval/loss", "eval/perplexity"
PERF_TOKENS_PER_SEC, PERF_STEP_TIME_SEC, PERF_MFU = "perf/tokens_per_sec", "perf/step_time_sec", "perf/mfu"
# The run's config as text; tensorboardX writes it under config/text_summary.
CONFIG = "config"
HPARAMS_PREFIX = "_hparams_/"   # the HParams plugin's own entries (written by tensorboardX)

_EIGENVALUES, _ESD, _HEATMAP = "eigenvalues", "esd", "_heatmap"
_NAME = re.compile(r"^[^/]+$")


def _name(what: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"tag {what} {name!r}: a non-empty name without '/'")
    return name


def _metric(metric: str) -> str:
    _name("metric", metric)
    if metric in (_EIGENVALUES, _ESD) or metric.endswith(_HEATMAP) or metric in HEAD_REDUCTIONS:
        raise ValueError(f"tag metric {metric!r}: reserved for eigenvalue histograms, ESD images, "
                         f"heatmaps or head reductions")
    return metric


def _layer(layer: int) -> str:
    if int(layer) != layer or layer < 0:
        raise ValueError(f"tag layer {layer!r}: a non-negative integer")
    return f"layer_{int(layer):02d}"


def _heads(heads: str | None) -> str:
    if heads is None:
        return ""
    if heads not in HEAD_REDUCTIONS:
        raise ValueError(f"tag heads {heads!r}: one of {HEAD_REDUCTIONS} or None")
    return f"{heads}/"


def spectral(matrix: str, metric: str, layer: int, heads: str | None = None) -> str:
    """spectral/<matrix>/<metric>/layer_<LL>, or .../<heads>/layer_<LL> for a per-head matrix."""
    return f"spectral/{_name('matrix', matrix)}/{_metric(metric)}/{_heads(heads)}{_layer(layer)}"


def spectral_over_layers(matrix: str, metric: str, reduction: str, heads: str | None = None) -> str:
    """spectral/<matrix>/<metric>/{mean,max} over the layers, or .../<heads>/<reduction>."""
    if reduction not in OVER_LAYERS:
        raise ValueError(f"tag reduction {reduction!r}: one of {OVER_LAYERS}")
    return f"spectral/{_name('matrix', matrix)}/{_metric(metric)}/{_heads(heads)}{reduction}"


def eigenvalues(matrix: str, layer: int) -> str:
    """The histogram of a layer's eigenvalues (a per-head matrix pools its heads)."""
    return f"spectral/{_name('matrix', matrix)}/{_EIGENVALUES}/{_layer(layer)}"


def esd(matrix: str, layer: int) -> str:
    """The image of a layer's ESD against its null law."""
    return f"spectral/{_name('matrix', matrix)}/{_ESD}/{_layer(layer)}"


def heatmap(matrix: str, metric: str) -> str:
    """The layer x step image of one metric."""
    return f"spectral/{_name('matrix', matrix)}/{_metric(metric)}{_HEATMAP}"


def activations(metric: str, layer: int) -> str:
    return f"activations/{_metric(metric)}/{_layer(layer)}"


def tail_fit(matrix: str, metric: str, layer: int) -> str:
    """A power-law tail fit's value of a layer (`mla_rmt.analyze`)."""
    return f"tail_fit/{_name('matrix', matrix)}/{_metric(metric)}/{_layer(layer)}"


def final(name: str) -> str:
    """A final metric of the HParams entry."""
    return f"final/{_name('final metric', name)}"


class Tag(NamedTuple):
    """A parsed tag. kind: 'spectral', 'spectral_over_layers', 'eigenvalues', 'esd', 'heatmap',
    'activations', 'tail_fit', 'train', 'eval', 'perf', 'final', 'config' or 'hparams'."""
    kind: str
    matrix: str | None = None
    metric: str | None = None
    heads: str | None = None
    layer: int | None = None
    reduction: str | None = None


_PATTERNS = (
    ("eigenvalues", re.compile(rf"^spectral/(?P<matrix>[^/]+)/{_EIGENVALUES}/layer_(?P<layer>\d+)$")),
    ("esd", re.compile(rf"^spectral/(?P<matrix>[^/]+)/{_ESD}/layer_(?P<layer>\d+)$")),
    ("heatmap", re.compile(rf"^spectral/(?P<matrix>[^/]+)/(?P<metric>[^/]+){_HEATMAP}$")),
    ("spectral", re.compile(r"^spectral/(?P<matrix>[^/]+)/(?P<metric>[^/]+)/"
                            r"(?:(?P<heads>head_mean|head_max)/)?layer_(?P<layer>\d+)$")),
    ("spectral_over_layers", re.compile(r"^spectral/(?P<matrix>[^/]+)/(?P<metric>[^/]+)/"
                                        r"(?:(?P<heads>head_mean|head_max)/)?(?P<reduction>mean|max)$")),
    ("activations", re.compile(r"^activations/(?P<metric>[^/]+)/layer_(?P<layer>\d+)$")),
    ("tail_fit", re.compile(r"^tail_fit/(?P<matrix>[^/]+)/(?P<metric>[^/]+)/layer_(?P<layer>\d+)$")),
    ("train", re.compile(r"^train/(?P<metric>[^/]+)$")),
    ("eval", re.compile(r"^eval/(?P<metric>[^/]+)$")),
    ("perf", re.compile(r"^perf/(?P<metric>[^/]+)$")),
    ("final", re.compile(r"^final/(?P<metric>[^/]+)$")),
    ("config", re.compile(rf"^{CONFIG}(?:/text_summary)?$")),
    ("hparams", re.compile(rf"^{HPARAMS_PREFIX}(?P<metric>[^/]+)$")),
)


def parse(tag: str) -> Tag | None:
    """The parts of a tag of this schema, None for any other tag. Per-head layer tags of exports
    written before head reductions had their own tags (no heads part) parse with heads=None."""
    for kind, pattern in _PATTERNS:
        if m := pattern.match(tag):
            parts = m.groupdict()
            layer = parts.pop("layer", None)
            return Tag(kind, layer=None if layer is None else int(layer), **parts)
    return None
