"""Analysis of tinyablate sweeps: `python -m analysis runs/<sweep> --out DIR` (see analysis.report)."""

from .data import load_sweeps
from .report import analyze
from .wandb_summary import log_wandb_summary

__all__ = ["analyze", "load_sweeps", "log_wandb_summary"]
