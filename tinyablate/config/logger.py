"""Where a cell's metrics are mirrored: W&B mode, project, entity, tags (the JSONL sink is always on)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from .checks import Checks, Section

LOGGER_MODES = ("online", "offline", "disabled")
TAG_MAX_LEN = 64  # W&B's limit on one tag


@dataclass
class LoggerConfig(Section):
    # W&B mode: "offline" writes the run under `dir` for a later `wandb sync`; "online" streams
    # it to the W&B server (needs network and WANDB_API_KEY); "disabled" writes only the JSONL.
    mode: str = "offline"
    # W&B project every cell of a sweep logs to.
    project: str = "tinyablate"
    # W&B entity (user or team); None uses the API key's default entity.
    entity: Optional[str] = None
    # Tags put on every run (each at most 64 characters).
    tags: List[str] = field(default_factory=list)
    # Folder that receives W&B's `wandb/` folder; None puts it in the cell directory.
    dir: Optional[str] = None
    # A file holding the W&B API key (make it readable by you only), read by the cell itself when
    # W&B starts. Safer than exporting WANDB_API_KEY for SLURM: sbatch stores the submitting
    # environment with the job, and the launcher leaves WANDB_API_KEY out of it when this is set
    # (README, "W&B and secrets"). None: WANDB_API_KEY or `wandb login`.
    api_key_file: Optional[str] = None

    section = "logger"

    def check(self, c: Checks) -> None:
        c.choice("mode", self.mode, LOGGER_MODES)
        c.string("project", self.project)
        c.string("entity", self.entity, optional=True)
        if not isinstance(self.tags, (list, tuple)) or not all(_is_tag(t) for t in self.tags):
            c.fail("tags", self.tags, f"a list of non-empty strings of at most {TAG_MAX_LEN} chars")
        c.string("dir", self.dir, optional=True, note=" (None: the cell directory)")
        c.string("api_key_file", self.api_key_file, optional=True, note=" (a file holding the W&B API key)")


def _is_tag(tag: object) -> bool:
    """A W&B tag: a non-empty string of at most 64 characters."""
    return isinstance(tag, str) and 0 < len(tag) <= TAG_MAX_LEN
