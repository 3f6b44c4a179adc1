"""Hydra ConfigStore registration of the typed config (composition only; no launching here).

conf/config.yaml lists `root_schema` first in its defaults, so every composed config is checked
against `RootConfig`'s field types: the cell's fields (`CellSpec`) plus the options of one launch
(dry run, wait, retry, status), which are not part of any cell.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .spec import CellSpec, validate_spec


@dataclass
class RootConfig(CellSpec):
    """A composed config: one cell's spec plus what to do with the sweep it belongs to."""

    # Validate every cell and print one line per cell (axes, trainable parameters, bytes, estimated
    # GPU-hours); submit nothing. Invalid cells are listed with reasons and the exit code is 2.
    dry_run: bool = False
    # Block until every submitted cell ends and print the status table (SLURM only can return at once).
    wait: bool = True
    # Re-run cells whose result says failed (they are skipped otherwise).
    retry_failed: bool = False
    # Print every cell's state (pending, running, completed, failed with its log) and submit nothing.
    status: bool = False


_CELL_FIELDS = tuple(f.name for f in fields(CellSpec))


def register_schemas() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="root_schema", node=RootConfig)


def root_from_hydra(cfg) -> RootConfig:
    from omegaconf import OmegaConf

    root = OmegaConf.to_object(cfg)
    if not isinstance(root, RootConfig):
        raise TypeError(f"expected the composed config to be a RootConfig, got {type(root).__name__}")
    return root


def cell_spec(root: CellSpec) -> CellSpec:
    """The CellSpec part of a RootConfig (launch options dropped)."""
    return CellSpec(**{name: getattr(root, name) for name in _CELL_FIELDS})


def spec_from_hydra(cfg) -> CellSpec:
    """A validated CellSpec from a composed Hydra/OmegaConf config."""
    return validate_spec(cell_spec(root_from_hydra(cfg)))
