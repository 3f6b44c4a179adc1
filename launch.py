"""Run a tinyablate cell (and, with -m, a sweep) from the composed Hydra config.

    python launch.py                                   # the default cell: SmolLM2-135M, TinyLoRA, GRPO, arithmetic
    python launch.py adapter.u=13 adapter.tie=all      # any axis on the command line
    python launch.py model=qwen2.5-7b task=gsm8k algo=grpo task.data_dir=/data/gsm8k
    python launch.py logger=online                     # W&B online (WANDB_API_KEY in the environment)

Configs: conf/ (groups model, adapter, algo, task, eval, logger), typed by tinyablate/spec.py.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from tinyablate.config_schema import register_schemas, spec_from_hydra

register_schemas()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from tinyablate.cell import cell_dir_for, run_cell

    spec = spec_from_hydra(cfg)  # validated before any weight loads
    result = run_cell(spec)
    metrics = result["metrics"]
    print(f"\ncell {result['cell_id']}: accuracy {metrics['accuracy']:.3f} (base {metrics['base_accuracy']:.3f}, "
          f"n={metrics['n_eval']}, {result['adapter']['trainable_params']:,} trainable parameters)")
    print(f"result: {cell_dir_for(spec) / 'result.json'}")


if __name__ == "__main__":
    sys.exit(main())
