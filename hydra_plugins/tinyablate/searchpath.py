"""Adds the repository root to Hydra's search path, so sweeps/<name>.yaml is the group `sweeps`."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

REPO = Path(__file__).resolve().parents[2]


class TinyablateSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if (REPO / "sweeps").is_dir():
            search_path.append(provider="tinyablate-sweeps", path=f"file://{REPO}")
