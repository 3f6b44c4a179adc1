"""What produced a result: code version, package versions, machine and devices.

`collect_provenance()` is cheap (well under 0.5 s): package versions come from
`importlib.metadata` (nothing is imported), and device details come from torch only when the
caller has already imported it. It never raises for a missing git, repository or package.
"""

import datetime
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

# Distributions whose versions are recorded (None when not installed).
PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "wandb",
    "hydra-core",
    "omegaconf",
    "submitit",
    "accelerate",
)
# Scheduler / device environment variables worth keeping next to a result.
ENV_VARS = (
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_NODELIST",
    "CUDA_VISIBLE_DEVICES",
)
_GIT_TIMEOUT_S = 5.0
# The checkout tinyablate itself runs from (the default repository to describe).
_PACKAGE_REPO = Path(__file__).resolve().parent.parent


def collect_provenance(repo_dir: Union[str, Path, None] = None) -> Dict[str, Any]:
    """A JSON-serializable record of code, environment and devices.

    `repo_dir` is the git work tree to describe; None means the checkout tinyablate runs from.
    """
    return {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "git": git_info(repo_dir if repo_dir is not None else _PACKAGE_REPO),
        "packages": package_versions(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "devices": device_info(),
        "env": {name: os.environ[name] for name in ENV_VARS if name in os.environ},
    }


def git_info(repo_dir: Union[str, Path]) -> Dict[str, Any]:
    """{"commit": HEAD hash or None, "dirty": bool or None, "branch": name or None}.

    All None outside a git work tree, without git, or before the first commit. "dirty" means
    tracked files differ from HEAD (untracked files are ignored).
    """
    commit = _git(repo_dir, "rev-parse", "--verify", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "branch": None}
    status = _git(repo_dir, "status", "--porcelain", "--untracked-files=no")
    branch = _git(repo_dir, "rev-parse", "--abbrev-ref", "HEAD")
    return {
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "branch": None if branch in (None, "HEAD") else branch,
    }


def _git(repo_dir: Union[str, Path], *args: str) -> Optional[str]:
    """stdout of `git -C repo_dir args...` stripped, or None if git fails or is missing."""
    try:
        out = subprocess.run(
            ["git", "-C", str(repo_dir), *args],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=True,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def package_versions() -> Dict[str, Optional[str]]:
    """Installed version of each of PACKAGES (None when not installed)."""
    versions: Dict[str, Optional[str]] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_info() -> Dict[str, Any]:
    """CPU count, and CUDA details from torch when the caller has imported it.

    Without torch loaded, "torch_loaded" is False and the CUDA fields are None; GPU names then
    come from the NVIDIA driver's /proc entries when present. GPU names are read through torch
    only when CUDA is already initialized, so this never creates a CUDA context.
    """
    info: Dict[str, Any] = {"cpu_count": os.cpu_count(), "cpu_usable": _usable_cpus()}
    torch = sys.modules.get("torch")
    info["torch_loaded"] = torch is not None
    info["torch_threads"] = torch.get_num_threads() if torch is not None else None  # a CPU cell's thread pool
    info.update(_torch_cuda_info(torch) if torch is not None else _no_torch_cuda_info())
    if not info["gpu_names"]:
        info["gpu_names"] = _proc_gpu_names()
    return info


def _usable_cpus() -> Optional[int]:
    """CPUs this process may run on (its affinity mask), where the OS tells."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _torch_cuda_info(torch: Any) -> Dict[str, Any]:
    """CUDA availability, device count and names, and torch's CUDA version."""
    try:
        available = bool(torch.cuda.is_available())
        count = int(torch.cuda.device_count()) if available else 0
        names: List[str] = []
        if available and torch.cuda.is_initialized():
            names = [torch.cuda.get_device_name(i) for i in range(count)]
        return {"cuda_available": available, "gpu_count": count, "gpu_names": names, "torch_cuda": torch.version.cuda}
    except Exception as err:  # a broken driver must not stop a run from recording itself
        return {**_no_torch_cuda_info(), "cuda_error": repr(err)}


def _no_torch_cuda_info() -> Dict[str, Any]:
    """The CUDA fields when torch is not loaded (unknown, not False)."""
    return {"cuda_available": None, "gpu_count": None, "gpu_names": [], "torch_cuda": None}


def _proc_gpu_names() -> List[str]:
    """GPU models listed by the NVIDIA driver under /proc (empty without one)."""
    names = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            lines = info.read_text().splitlines()
        except OSError:
            continue
        names += [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model:")]
    return names
