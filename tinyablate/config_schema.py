"""Hydra ConfigStore registration of the cell schema (typed YAML composition, no launching here).

conf/config.yaml lists `cell_schema` first in its defaults, so every composed config is checked
against `CellSpec`'s field types, and `OmegaConf.to_object` turns it into a `CellSpec`.
"""

from __future__ import annotations

from .spec import CellSpec, validate_spec


def register_schemas() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="cell_schema", node=CellSpec)


def spec_from_hydra(cfg) -> CellSpec:
    """A validated CellSpec from a composed Hydra/OmegaConf config."""
    from omegaconf import OmegaConf

    spec = OmegaConf.to_object(cfg)
    if not isinstance(spec, CellSpec):
        raise TypeError(f"expected the composed config to be a CellSpec, got {type(spec).__name__}")
    return validate_spec(spec)
