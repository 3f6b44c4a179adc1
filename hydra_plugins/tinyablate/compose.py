"""Compose the config of every cell of a sweep, fast, with one error per cell (never one per grid).

Hydra composes a whole config per override list (~0.1 s each: minutes for a paper-sized grid).
Cells of a grid mostly differ in plain values (adapter.u=13, seed=2), not in config groups, so:
compose once per distinct set of group choices (model=..., algo=...), convert to the typed
RootConfig, then set each cell's plain values on a copy, with OmegaConf's type rules for scalars.
Anything else (+key, ~key, unknown keys, interpolations, dict values) takes Hydra's full path, and so does a cell
that sets a value an interpolation of its config reads (sweeps/embedded.yaml's learning rate by u reads adapter.u
and algo.name: resolved once, it would keep the first cell's rate).
"""

import copy
import dataclasses
import re
import typing
from functools import lru_cache
from typing import Any, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict, read_write

from .conf import root_from_hydra


def compose_cells(config_loader, base_config, job_overrides: Sequence[Sequence[str]]) -> list:
    """A RootConfig per override list, or the Exception that composing it raised."""
    parser = OverridesParser.create()
    bases: dict = {}
    out = []
    for overrides in job_overrides:
        try:
            out.append(_compose_one(config_loader, base_config, list(overrides), parser, bases))
        except Exception as err:  # reported per cell by the launcher
            out.append(err)
    return out


def _compose_one(loader, base_config, overrides: list, parser, bases: dict):
    parsed = parser.parse_overrides(overrides)
    groups = [o for o in parsed if _is_group(loader, o)]
    values = [o for o in parsed if not _is_group(loader, o)]
    if any(o.is_add() or o.is_force_add() or o.is_delete() or _needs_hydra(o.value()) for o in values):
        return _full(loader, base_config, overrides)  # Hydra resolves and merges these itself
    key = tuple(o.input_line for o in groups)
    if key not in bases:
        bases[key] = _base(loader, base_config, list(key))
    base, read = bases[key]
    if any(_overlaps(o.key_or_group, r) for o in values for r in read):  # an interpolation reads a value set here
        return _full(loader, base_config, overrides)
    root = copy.deepcopy(base)
    for o in values:
        if not _set_path(root, o.key_or_group, o.value()):
            return _full(loader, base_config, overrides)
    return root


def _needs_hydra(value) -> bool:
    """Interpolations and dict values: Hydra resolves and merges them, so they take its path."""
    if isinstance(value, dict):
        return True
    if isinstance(value, (list, tuple)):
        return any(_needs_hydra(v) for v in value)
    return isinstance(value, str) and "${" in value


def _is_group(loader, override) -> bool:
    name = override.key_or_group
    return name.startswith("hydra/") or loader.repository.group_exists(name)


def _full(loader, base_config, overrides: list):
    return root_from_hydra(_load(loader, base_config, overrides))


def _base(loader, base_config, overrides: list) -> tuple:
    """The RootConfig of a set of group choices, and the keys its interpolations read."""
    cfg = _load(loader, base_config, overrides)
    return root_from_hydra(cfg), _interpolation_reads(cfg)


def _load(loader, base_config, overrides: list):
    cfg = loader.load_sweep_config(base_config, overrides)
    with read_write(cfg), open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")  # ${adapter.u}, also inside a resolver's arguments


def _interpolation_reads(node) -> set:
    """The dotted keys that the interpolations of this (unresolved) config read."""
    reads = set()
    keys = range(len(node)) if OmegaConf.is_list(node) else node.keys()
    for k in keys:
        child = node._get_node(k)
        if OmegaConf.is_interpolation(node, k):
            reads.update(_REFERENCE.findall(str(child._value())))
        elif OmegaConf.is_config(child) and not child._is_none():
            reads |= _interpolation_reads(child)
    return reads


def _overlaps(key: str, read: str) -> bool:
    return key == read or read.startswith(key + ".") or key.startswith(read + ".")


def _set_path(obj: Any, dotted: str, value: Any) -> bool:
    """Set a dataclass field by dotted path with OmegaConf's scalar typing; False if not a field."""
    *parents, last = dotted.split(".")
    for name in parents:
        if not dataclasses.is_dataclass(obj) or name not in _field_types(type(obj)):
            return False
        obj = getattr(obj, name)
    if not dataclasses.is_dataclass(obj) or last not in _field_types(type(obj)):
        return False
    setattr(obj, last, _coerce(dotted, value, _field_types(type(obj))[last]))
    return True


@lru_cache(maxsize=None)
def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert like OmegaConf: ints to floats, numeric strings to numbers; reject what it rejects."""
    node = OmegaConf.structured(_holder(hint))
    try:
        node.value = value
    except Exception as err:
        raise ValueError(f"{key}={value!r} is invalid: {err.__class__.__name__}: {str(err).splitlines()[0]}") from err
    out = OmegaConf.to_container(node)["value"]
    return copy.deepcopy(out)


@lru_cache(maxsize=None)
def _holder(hint):
    return dataclasses.make_dataclass("Holder", [("value", hint, dataclasses.field(default="???"))])
