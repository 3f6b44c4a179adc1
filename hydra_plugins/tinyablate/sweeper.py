"""Hydra's basic (cartesian) sweeper without its per-cell pre-composition, plus unions of grids.

BasicSweeper composes every cell's full config before launching, only to check it (0.1-0.2 s a
cell: minutes for a paper-sized grid). Our launcher composes and validates every cell itself, faster
and with a message per invalid cell, so that pre-check is skipped here.

`hydra.sweeper.grids` (a list of {key: values}) makes a sweep the union of several cartesian grids, each taken
with `hydra.sweeper.params` (the axes every grid shares, e.g. seeds) and the command line's overrides (which win
over a grid's key of the same name); a cell in two grids runs once. E.g. sweeps/evidence.yaml: a parameter curve
by GRPO and SFT, plus a rank ablation at one u, plus tiled vs structured.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser


class TinyablateSweeper(BasicSweeper):
    def __init__(
        self,
        max_batch_size: Optional[int] = None,
        params: Optional[Dict[str, str]] = None,
        grids: Optional[List[Dict[str, Any]]] = None,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grids = [dict(g) for g in grids] if grids else None
        self._arguments: List[str] = []

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        return None  # every cell is composed and validated by TinyablateLauncher.launch

    def sweep(self, arguments: List[str]) -> Any:
        self._arguments = list(arguments)
        return super().sweep(arguments)

    def split_arguments(self, overrides, max_batch_size):  # BasicSweeper.sweep calls it on self
        if not self.grids:
            return BasicSweeper.split_arguments(overrides, max_batch_size)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        given = {a.split("=", 1)[0].lstrip("+~") for a in self._arguments}
        cells, seen = [], set()
        for grid in self.grids:
            params = {**(self.params or {}), **grid}
            conf = [f"{k}={v}" for k, v in params.items() if k not in given] + self._arguments
            for batch in BasicSweeper.split_arguments(parser.parse_overrides(conf), None):
                for cell in batch:
                    if tuple(cell) not in seen:
                        seen.add(tuple(cell))
                        cells.append(list(cell))
        size = max_batch_size or max(len(cells), 1)
        return [cells[i : i + size] for i in range(0, len(cells), size)]


@dataclass
class SweeperConf:
    _target_: str = "hydra_plugins.tinyablate.sweeper.TinyablateSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None
    # Several cartesian grids whose union is the sweep (each with `params`): see the module docstring.
    grids: Optional[List[Dict[str, Any]]] = None


def register() -> None:
    ConfigStore.instance().store(group="hydra/sweeper", name="tinyablate", node=SweeperConf, provider="tinyablate")
