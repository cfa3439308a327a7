"""Dotted config fields ('model.attention.kind') read from and written into a ConfigDict or a
nested dict: what sweeps set, what the HParams row and the trial tables read."""
_REQUIRED = object()


def get(tree, path: str, default=_REQUIRED):
    """The field at `path`; a missing field is a KeyError naming it, unless a default is given."""
    node = tree
    parts = path.split(".")
    for i, part in enumerate(parts):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            if default is not _REQUIRED:
                return default
            raise KeyError(f"config field {path!r}: {'.'.join(parts[:i]) or 'the config'} "
                           f"has no {part!r}") from None
    return node


def set(tree, path: str, value) -> None:  # pylint: disable=redefined-builtin
    """Sets the existing field at `path`; a field the tree lacks is a KeyError naming it."""
    parent_path, _, last = path.rpartition(".")
    parent = get(tree, parent_path) if parent_path else tree
    try:
        known = last in parent
    except TypeError:
        known = False
    if not known:
        raise KeyError(f"config field {path!r}: {parent_path or 'the config'} has no {last!r}")
    parent[last] = value
