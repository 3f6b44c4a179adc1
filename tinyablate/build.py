"""Building a cell: its model loaded, its adapter applied, its tasks read (`build` → `BuiltCell`).

    from tinyablate.build import build
    built = build(spec)              # built.model (adapted), .tokenizer, .adapter, .task, .eval_tasks, .device

What training (train/run.py) and evaluation (evaluation/plan.py) use; cell.py builds once per cell, on
every rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from transformers import set_seed

from . import distributed
from .adapters import Adapter, apply_adapter
from .config import CellSpec, ModelInfo, eval_task_configs
from .distributed import Ranks
from .models import load_model_and_tokenizer, model_identity
from .tasks import Task, load_task


@dataclass
class BuiltCell:
    """What build() makes of a cell: the adapted model, tokenizer, tasks and device that training and evaluation use."""

    model: torch.nn.Module  # the adapted model (adapter.model)
    tokenizer: object  # a transformers tokenizer
    info: ModelInfo
    adapter: Adapter
    task: Task
    model_id: str
    device: torch.device
    load_s: float = 0.0  # reading the weights (excluded from the per-cell overhead)
    ranks: Ranks = Ranks()
    eval_tasks: dict = field(default_factory=dict)  # name -> Task: the training task first, then eval.tasks


def build(spec: CellSpec, ranks: Ranks = Ranks()) -> BuiltCell:
    """Load the model and task, and apply the adapter (validated against the model first).

    Every rank builds the same thing; that the model and adapter agree across ranks is checked.
    """
    task = load_task(spec.task)  # data errors surface before the model loads (the evaluation tasks' too)
    eval_tasks = {
        name: task if name == spec.task.name else load_task(cfg) for name, cfg in eval_task_configs(spec).items()
    }
    if spec.train and spec.adapter.kind != "none":
        task.train_problems()  # a task without a training split says so before the model loads
    t0 = time.time()
    model, tokenizer, info = load_model_and_tokenizer(_model_config(spec, ranks))
    load_s = time.time() - t0
    model_id = model_identity(spec.model, model)
    set_seed(spec.seed)
    with distributed.main_first():  # rank 0 fills the SVD cache; the others read the same factors from it
        adapter = apply_adapter(model, spec.adapter, model_id)
    device = next(model.parameters()).device
    if ranks.distributed:  # DDP syncs only the trainable tensors: everything else must already agree
        distributed.require_same_on_all_ranks(
            distributed.tensors_fingerprint(adapter.model),
            "the model and adapter built (sampled weights and SVD factors)",
        )
    return BuiltCell(adapter.model, tokenizer, info, adapter, task, model_id, device, load_s, ranks, eval_tasks)


def _model_config(spec: CellSpec, ranks: Ranks = Ranks()):
    """model.device=auto follows the cell's `gpus`: cuda when it asks for a GPU, cpu otherwise.
    Rank r of a multi-GPU cell uses cuda:LOCAL_RANK."""
    if spec.model.device not in ("auto", "cuda"):
        return spec.model
    if spec.gpus > 0:
        if not torch.cuda.is_available():  # (each rank's own GPU was checked when it joined the group)
            raise RuntimeError(
                f"gpus={spec.gpus} but no CUDA device is visible to this process; run it on a GPU "
                "node (hydra/launcher=slurm requests one) or set gpus=0 for CPU"
            )
        return replace(spec.model, device=f"cuda:{ranks.local_rank}" if ranks.distributed else "cuda")
    if spec.model.device == "cuda":
        return spec.model
    return replace(spec.model, device="cpu")
