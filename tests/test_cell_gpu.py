"""A whole cell on a CUDA GPU: bf16 base, fp32 v, fused adapter, GRPO and SFT through TRL.

Run on a GPU machine: pytest -m gpu tests/test_cell_gpu.py
"""

from __future__ import annotations

import pytest
import torch

from tinyablate.adapters import AdapterConfig
from tinyablate.cell import run_cell
from tinyablate.eval import EvalConfig
from tinyablate.logging import LoggerConfig
from tinyablate.models import ModelConfig
from tinyablate.spec import CellSpec
from tinyablate.tasks import TaskConfig
from tinyablate.train.config import AlgoConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("algo,kind", [("grpo", "tinylora"), ("sft", "tinylora"), ("grpo", "lora_xs"), ("sft", "lora")])
def test_cell_on_gpu(tmp_path, algo, kind):
    spec = CellSpec(
        model=ModelConfig(name="tiny-qwen2", device="cuda", dtype="auto", cache_dir=str(tmp_path / "cache")),
        adapter=AdapterConfig(kind=kind, r=2, u=4, tie=2),
        task=TaskConfig(name="arithmetic", max_value=9, train_size=40, eval_size=16, scorer="flexible"),
        algo=AlgoConfig(name=algo, max_steps=3, learning_rate=1e-2, prompts_per_step=4, num_generations=4,
                        micro_batch_size=8 if algo == "grpo" else 4, max_completion_length=12, max_length=96,
                        save_steps=2),
        eval=EvalConfig(batch_size=16, max_new_tokens=12),
        logger=LoggerConfig(mode="disabled"), output_dir=str(tmp_path / "runs"), sweep="gpu", gpus=1,
    )
    result = run_cell(spec)
    assert result["status"] == "completed" and result["metrics"]["train_steps"] == 3
    assert result["timing"]["n_gpus"] == 1 and result["timing"]["gpu_hours"] > 0
    assert result["provenance"]["devices"]
