"""Dotted config fields ('model.attention.kind') read from and written into a ConfigDict or a
nested dict: what sweeps set, what the HParams row and the trial tables read."""
_REQUIRED = object()


def _missing(path: str, parts: list[str], i: int) -> KeyError:
    return KeyError(f"config field {path!r}: {'.'.join(parts[:i]) or 'the config'} has no {parts[i]!r}")


def _parent(tree, path: str):
    """The node holding the field at `path`, and the field's name."""
    parts = path.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            raise _missing(path, parts, i) from None
    if not (hasattr(node, "keys") and parts[-1] in node):     # a dict or a ConfigDict
        raise _missing(path, parts, len(parts) - 1)
    return node, parts[-1]


def get(tree, path: str, default=_REQUIRED):
    """The field at `path`; a missing field is a KeyError naming it, unless a default is given."""
    try:
        node, name = _parent(tree, path)
    except KeyError:
        if default is _REQUIRED:
            raise
        return default
    return node[name]


def set(tree, path: str, value) -> None:  # pylint: disable=redefined-builtin
    """Sets the existing field at `path`; a field the tree lacks is a KeyError naming it."""
    node, name = _parent(tree, path)
    node[name] = value
