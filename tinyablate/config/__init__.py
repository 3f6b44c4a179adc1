"""Every typed setting of tinyablate, its validation, and a cell's identity: the standard library only.

    from tinyablate.config import CellSpec, AdapterConfig, validate_spec, cell_id
    spec = validate_spec(CellSpec(adapter=AdapterConfig(u=13, tie="all")))   # ConfigError lists every problem
    cell_id(spec)                                                            # stable across runs

One module per section (model, adapter, task, algo, eval, logger), the cell spec and Hydra root
(spec.py), the identity (identity.py) and the validation vocabulary (checks.py). Importing this
package loads no torch, transformers or trl (a test checks it), so launchers, analysis and dry runs
can read and check configs without them.
"""

from .adapter import AdapterConfig, SVDConfig, count_groups
from .algo import AlgoConfig
from .checks import Checks, ConfigError, Section
from .eval import EvalConfig
from .identity import cell_id, cell_label, identity_dict
from .logger import LoggerConfig
from .model import MODELS, ModelConfig, ModelInfo
from .spec import (
    CellSpec,
    RootConfig,
    cell_spec,
    eval_task_configs,
    spec_from_dict,
    spec_problems,
    spec_to_dict,
    validate_spec,
)
from .task import TaskConfig

__all__ = [
    "AdapterConfig",
    "AlgoConfig",
    "CellSpec",
    "Checks",
    "ConfigError",
    "EvalConfig",
    "LoggerConfig",
    "MODELS",
    "ModelConfig",
    "ModelInfo",
    "RootConfig",
    "SVDConfig",
    "Section",
    "TaskConfig",
    "cell_id",
    "cell_label",
    "cell_spec",
    "count_groups",
    "eval_task_configs",
    "identity_dict",
    "spec_from_dict",
    "spec_problems",
    "spec_to_dict",
    "validate_spec",
]
