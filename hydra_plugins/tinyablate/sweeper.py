"""Hydra's basic (cartesian) sweeper without its per-cell pre-composition.

BasicSweeper composes every cell's full config before launching, only to check it (0.1-0.2 s a
cell: minutes for a paper-sized grid). Our launcher composes and validates every cell itself, faster
and with a message per invalid cell, so that pre-check is skipped here.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore


class TinyablateSweeper(BasicSweeper):
    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        return None  # every cell is composed and validated by TinyablateLauncher.launch


@dataclass
class SweeperConf:
    _target_: str = "hydra_plugins.tinyablate.sweeper.TinyablateSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


def register() -> None:
    ConfigStore.instance().store(group="hydra/sweeper", name="tinyablate", node=SweeperConf, provider="tinyablate")
