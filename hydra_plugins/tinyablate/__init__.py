"""tinyablate's Hydra glue: the sweeps/ search path and the local/SLURM launchers (on submitit).

This is the only place (with launch.py) that imports submitit or Hydra's launcher machinery; the
library in tinyablate/ runs a cell from a plain spec.
"""
