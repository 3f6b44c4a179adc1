"""collect_provenance: keys, git state, robustness and speed."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinyablate.provenance import PACKAGES, collect_provenance

REPO = Path(__file__).resolve().parent.parent


def _git(repo, *args):
    """stdout of a git command, or None when it fails (e.g. HEAD before the first commit)."""
    out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def test_keys_present_and_json_serializable():
    prov = collect_provenance()
    assert {"timestamp_utc", "git", "packages", "python", "platform", "hostname", "devices"} <= set(prov)
    assert set(prov["packages"]) == set(PACKAGES)
    from importlib.metadata import version

    assert prov["packages"]["wandb"] == version("wandb")
    assert prov["python"] == ".".join(map(str, sys.version_info[:3]))
    assert prov["timestamp_utc"].endswith("+00:00")
    devices = prov["devices"]
    assert {"cuda_available", "gpu_count", "gpu_names", "torch_cuda", "cpu_count"} <= set(devices)
    assert devices["cpu_count"] >= 1
    assert json.loads(json.dumps(prov)) == prov


def test_device_info_uses_loaded_torch():
    torch = pytest.importorskip("torch")
    devices = collect_provenance()["devices"]
    assert devices["torch_loaded"] is True
    assert devices["cuda_available"] == torch.cuda.is_available()
    assert devices["gpu_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert devices["torch_cuda"] == torch.version.cuda


@pytest.mark.skipif(_git(REPO, "--version") is None, reason="git not installed")
def test_git_commit_of_this_repo():
    # The project repo may have no commit yet: then HEAD does not resolve and commit is None.
    git = collect_provenance(REPO)["git"]
    assert git["commit"] == _git(REPO, "rev-parse", "--verify", "HEAD")
    assert git["commit"] == collect_provenance()["git"]["commit"]  # default: tinyablate's repo


@pytest.mark.skipif(_git(REPO, "--version") is None, reason="git not installed")
def test_git_commit_and_dirty_flag(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    assert collect_provenance(repo)["git"] == {"commit": None, "dirty": None, "branch": None}
    (repo / "a.txt").write_text("1\n")
    _git(repo, "add", "a.txt")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    git = collect_provenance(repo)["git"]
    assert git["commit"] == _git(repo, "rev-parse", "HEAD") and len(git["commit"]) == 40
    assert git["dirty"] is False
    assert git["branch"] == _git(repo, "rev-parse", "--abbrev-ref", "HEAD")
    (repo / "untracked.txt").write_text("x\n")
    assert collect_provenance(repo)["git"]["dirty"] is False
    (repo / "a.txt").write_text("2\n")
    assert collect_provenance(repo)["git"]["dirty"] is True


def test_no_crash_outside_git_or_without_git(tmp_path, monkeypatch):
    assert collect_provenance(tmp_path)["git"]["commit"] is None
    assert collect_provenance(tmp_path / "missing")["git"]["commit"] is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable on PATH
    prov = collect_provenance(REPO)
    assert prov["git"] == {"commit": None, "dirty": None, "branch": None}


def test_fast_and_imports_nothing_heavy():
    # In a fresh interpreter: time the import and call, and list what they newly imported.
    code = (
        "import sys, time, tinyablate; before = set(sys.modules); t = time.perf_counter();"
        "from tinyablate.provenance import collect_provenance; collect_provenance();"
        "print(time.perf_counter() - t, *sorted(set(sys.modules) - before))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout.split()
    assert float(out[0]) < 0.5
    heavy = {"torch", "transformers", "trl", "peft", "wandb", "accelerate", "numpy"}
    assert "tinyablate.provenance" in out[1:]
    assert heavy.isdisjoint(name.split(".")[0] for name in out[1:])
    start = time.perf_counter()
    collect_provenance()
    assert time.perf_counter() - start < 0.5
