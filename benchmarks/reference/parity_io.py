"""Reading and writing the arrays that benchmarks/parity.py exchanges with its reference drivers.

Standard library and numpy only: the drivers import it from a throwaway virtual environment that
has none of this project's packages. A file is one `.npz`; nested parameter trees are stored with
their path joined by "/" (e.g. `init/critic/VmapCritic_0/Dense_0/kernel`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """{"a/b/c": leaf} for a nested mapping (dict, FrozenDict) of arrays."""
    flat = {}
    for name, value in tree.items():
        path = f"{prefix}/{name}" if prefix else str(name)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = np.asarray(value)
    return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    """The nested dict that `flatten` came from."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def subtree(flat: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The entries under `prefix/`, with the prefix removed."""
    start = prefix + "/"
    return {path[len(start):]: value for path, value in flat.items() if path.startswith(start)}


def save(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    np.savez(path, **{name: np.asarray(value) for name, value in arrays.items()})


def load(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}
