"""MetricLogger, redaction and the offline W&B reader, against real wandb 0.31 offline runs."""

import json
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tinyablate.metrics import (
    REDACTED,
    LoggerConfig,
    MetricLogger,
    json_safe,
    read_metrics,
    redact,
    wandb_run_id,
)
from tinyablate.wandb_files import (
    BLOCK_SIZE,
    FILE_HEADER,
    FIRST,
    FULL,
    LAST,
    MIDDLE,
    WandbFileError,
    has_exit_record,
    iter_chunks,
    read_payloads,
    wait_for_exit_record,
)
from wandb_reader import find_offline_runs, read_run, read_runs, run_file

SECRET = "wandbsecret0123456789abcdef0123456789abcd"
HF_SECRET = "hf_tokenvalue9876543210zyxwvu"
CELL_ID = "sweep-a/lora_r=8,lr=1e-3/seed=0"
# Over two 32 KiB blocks: the run record holding the config is split across three blocks.
LONG_NOTE = "".join(f"line {i:05d};" for i in range(7000))
CONFIG = {
    "lr": 1e-3,
    "model": {"name": "tiny", "max_new_tokens": 16, "pad_token_id": 0, "tokenizer": "gpt2"},
    "api_key": SECRET,
    "auth": {"hf_token": HF_SECRET, "note": f"the key is {SECRET}"},
    "long_note": LONG_NOTE,
}
FIRST_STEPS = {
    1: {"loss": 2.0, "eval/accuracy": 0.25},
    2: {"loss": np.float32(1.5)},
    3: {"loss": 1.0, "eval/accuracy": 0.5},
}
RESUMED_STEPS = {4: {"loss": 0.75}, 5: {"loss": 0.5, "eval/accuracy": 0.625}}


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory):
    """Offline, silent W&B with a fake API key in the environment and private W&B folders."""
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_API_KEY", SECRET)
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(home / var.lower()))
        yield home


@pytest.fixture(scope="module")
def resumed_cell(wandb_env, tmp_path_factory):
    """One cell logged in two sessions with the same run id; the second one crashes."""
    cell_dir = tmp_path_factory.mktemp("cell")
    run_id = wandb_run_id(CELL_ID)
    kwargs = dict(run_id=run_id, group="sweep-a", job_type="train", name=CELL_ID, config=CONFIG)
    cfg = LoggerConfig(tags=["smoke", "r8"])
    with MetricLogger(cell_dir, cfg, **kwargs) as logger:
        for step, metrics in FIRST_STEPS.items():
            logger.log(metrics, step=step)
        logger.summary({"eval/accuracy": 0.5, "WANDB_API_KEY": SECRET})
    with pytest.raises(RuntimeError, match="preempted"):
        with MetricLogger(cell_dir, cfg, **kwargs) as logger:
            for step, metrics in RESUMED_STEPS.items():
                logger.log(metrics, step=step)
            logger.summary({"eval/accuracy": 0.625, "final_step": 5})
            raise RuntimeError("preempted")
    return SimpleNamespace(dir=cell_dir, run_id=run_id, home=wandb_env)


def test_jsonl_holds_both_sessions(resumed_cell):
    rows = read_metrics(resumed_cell.dir)
    expected = {**FIRST_STEPS, **RESUMED_STEPS}
    assert [r["step"] for r in rows] == list(expected)
    for row in rows:
        assert {k: v for k, v in row.items() if k not in ("step", "time")} == pytest.approx(
            {k: float(v) for k, v in expected[row["step"]].items()}
        )
        assert isinstance(row["time"], float)


def test_summary_json_merges_sessions(resumed_cell):
    summary = json.loads((resumed_cell.dir / "summary.json").read_text())
    assert summary == {"eval/accuracy": 0.625, "final_step": 5, "WANDB_API_KEY": REDACTED}


def test_offline_run_reads_back(resumed_cell):
    segments = find_offline_runs(resumed_cell.dir, resumed_cell.run_id)
    assert len(segments) == 2
    first, second = read_run(segments[0]), read_run(segments[1])
    assert (first.exit_code, second.exit_code) == (0, 1)
    run = read_runs(resumed_cell.dir / "wandb", resumed_cell.run_id)
    assert run.run_id == resumed_cell.run_id
    assert (run.project, run.group, run.job_type, run.name) == ("tinyablate", "sweep-a", "train", CELL_ID)
    assert run.tags == ["smoke", "r8"]
    assert run.config["lr"] == 1e-3
    assert run.config["model"] == CONFIG["model"]
    assert run.config["long_note"] == LONG_NOTE


def test_offline_history_has_every_step(resumed_cell):
    run = read_runs(resumed_cell.dir, resumed_cell.run_id)
    expected = {**FIRST_STEPS, **RESUMED_STEPS}
    assert [row["_step"] for row in run.history] == list(expected)
    for row in run.history:
        logged = {k: float(v) for k, v in expected[row["_step"]].items()}
        assert {k: row[k] for k in logged} == pytest.approx(logged)


def test_offline_summary_keeps_explicit_values(resumed_cell):
    run = read_runs(resumed_cell.dir, resumed_cell.run_id)
    assert run.summary["eval/accuracy"] == 0.625
    assert run.summary["final_step"] == 5
    assert run.summary["loss"] == 0.5
    assert run.metrics["eval/accuracy"]["summary"] == {"last": True, "max": True}


def test_secret_never_on_disk(resumed_cell):
    # Links are followed: wandb links logs/debug-core.log to its cache folder.
    found = list(resumed_cell.dir.rglob("*")) + list(resumed_cell.home.rglob("*"))
    files = sorted({p.resolve() for p in found if p.is_file()})
    assert any(p.suffix == ".wandb" for p in files)
    assert any(p.name.startswith("core-debug") for p in files)
    blobs = {p: p.read_bytes() for p in files}
    # The scan does see the run's content: the run id is in the .wandb files and debug logs.
    assert any(resumed_cell.run_id.encode() in b for p, b in blobs.items() if p.suffix == ".wandb")
    for secret in (SECRET, HF_SECRET):
        leaks = [str(p) for p, blob in blobs.items() if secret.encode() in blob]
        assert leaks == [], f"{secret[:8]}... written to {leaks}"
    run = read_runs(resumed_cell.dir, resumed_cell.run_id)
    assert run.config["api_key"] == REDACTED
    assert run.config["auth"] == {"hf_token": REDACTED, "note": f"the key is {REDACTED}"}


def test_record_spanning_blocks_is_reassembled(resumed_cell):
    path = run_file(find_offline_runs(resumed_cell.dir, resumed_cell.run_id)[0])
    data = path.read_bytes()
    kinds = [kind for _, kind, _ in iter_chunks(data, path)]
    assert {FIRST, MIDDLE, LAST} <= set(kinds)
    assert max(len(p) for p in read_payloads(path)) > 2 * BLOCK_SIZE


def _chunk(kind: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF
    return struct.pack("<IHB", crc, len(payload), kind) + payload


def _write_log(path: Path, records) -> bytes:
    """A minimal LevelDB-log writer (the format wandb-core writes), for reader edge cases."""
    out = bytearray(FILE_HEADER)
    for record in records:
        first = True
        while True:
            left = BLOCK_SIZE - len(out) % BLOCK_SIZE
            if left < 7:
                out += b"\0" * left
                continue
            piece, record = record[: left - 7], record[left - 7 :]
            kind = (FULL if not record else FIRST) if first else (LAST if not record else MIDDLE)
            out += _chunk(kind, piece)
            first = False
            if not record:
                break
    path.write_bytes(bytes(out))
    return bytes(out)


def test_reader_block_padding_split_and_truncation(tmp_path):
    # The first record leaves 3 bytes at the end of block 0 (padding); the second spans 3 blocks.
    small = b"a" * (BLOCK_SIZE - len(FILE_HEADER) - 7 - 3)
    big = bytes(range(256)) * 300
    path = tmp_path / "run-x.wandb"
    data = _write_log(path, [small, big, b"tail"])
    assert list(read_payloads(path)) == [small, big, b"tail"]
    path.write_bytes(data[:-2])  # a writer killed mid-chunk: the torn record is dropped
    assert list(read_payloads(path)) == [small, big]
    corrupt = bytearray(data)
    corrupt[len(FILE_HEADER) + 10] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    with pytest.raises(WandbFileError, match="corrupt chunk"):
        list(read_payloads(path))
    path.write_bytes(b"LEVELDB" + data[7:])
    with pytest.raises(WandbFileError, match="header"):
        list(read_payloads(path))


def test_exit_record_detection(tmp_path):
    from wandb.proto.wandb_internal_pb2 import Record

    path = tmp_path / "run-x.wandb"
    assert not has_exit_record(path)  # not created yet
    path.write_bytes(b"")
    assert not has_exit_record(path)  # created, header not written yet
    running = Record()
    running.history.item.add(key="loss", value_json="1.5")
    _write_log(path, [running.SerializeToString()])
    assert not has_exit_record(path) and not wait_for_exit_record(path, timeout_s=0.05)
    finished = Record()
    finished.exit.exit_code = 2
    _write_log(path, [running.SerializeToString(), finished.SerializeToString()])
    assert has_exit_record(path) and wait_for_exit_record(path, timeout_s=0.05)
    assert read_run(path).exit_code == 2 and read_run(path).history == [{"loss": 1.5}]


def test_disabled_mode_writes_jsonl_only(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    cell = tmp_path / "cell"
    with MetricLogger(cell, LoggerConfig(mode="disabled"), run_id="abc", config=CONFIG) as lg:
        assert lg.run is None and lg.wandb_dir is None
        lg.log({"loss": 1.0, "note": f"key={SECRET}"}, step=0)
        lg.summary({"eval/accuracy": 0.5})
    assert sorted(p.name for p in cell.iterdir()) == ["metrics.jsonl", "summary.json"]
    assert read_metrics(cell)[0]["note"] == f"key={REDACTED}"
    with open(cell / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "lo')  # a torn last line from a crash
    assert [r["step"] for r in read_metrics(cell)] == [0]


def test_log_rejects_reserved_keys_and_closed_logger(tmp_path):
    lg = MetricLogger(tmp_path, LoggerConfig(mode="disabled"), run_id="abc")
    with pytest.raises(ValueError, match="reserved"):
        lg.log({"step": 3}, step=3)
    lg.close()
    lg.close()
    with pytest.raises(RuntimeError, match="closed"):
        lg.log({"loss": 1.0}, step=1)


@pytest.mark.parametrize(
    "field,value,allowed",
    [
        ("mode", "cloud", "'online', 'offline', 'disabled'"),
        ("project", "", "non-empty"),
        ("entity", "", "None or"),
        ("tags", ["x" * 65], "at most 64"),
        ("tags", "smoke", "a list of"),
        ("dir", 3, "None"),
    ],
)
def test_config_validation_names_field(tmp_path, field, value, allowed):
    cfg = LoggerConfig(**{field: value})
    with pytest.raises(ValueError, match=rf"logger\.{field}=") as err:
        cfg.validate()
    assert repr(value) in str(err.value) and allowed in str(err.value)
    with pytest.raises(ValueError, match=rf"logger\.{field}="):
        MetricLogger(tmp_path / "cell", cfg, run_id="abc")
    assert not (tmp_path / "cell").exists()


def test_bad_run_id_rejected(tmp_path):
    with pytest.raises(ValueError, match="wandb_run_id"):
        MetricLogger(tmp_path, LoggerConfig(mode="disabled"), run_id="Cell/1")


def test_wandb_run_id():
    run_id = wandb_run_id(CELL_ID)
    assert run_id == wandb_run_id(CELL_ID)
    assert run_id.startswith("sweepalorar8lr1e3seed0")
    for cell in (CELL_ID, "x" * 500, "Ünïcode cell ☃", "-"):
        rid = wandb_run_id(cell)
        assert 0 < len(rid) <= 64 and rid.isascii() and rid.isalnum() and rid == rid.lower()
    assert wandb_run_id("lr=1e-3") != wandb_run_id("lr1e3")
    with pytest.raises(ValueError):
        wandb_run_id("")


def test_redact_keys_and_env_values(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-abcdefgh1234")
    obj = {
        "apiKey": "k1",
        "WANDB_API_KEY": "k2",
        "client_secret": "k3",
        "db_password": "k4",
        "hf_token": None,
        "pad_token_id": 2,
        "pad_token": "<pad>",
        "max_new_tokens": 8,
        "tokenizer": "gpt2",
        "secrets": {"a": 1},
        "runs": [{"auth_token": "k5"}],
        "cmd": "curl -H tok-abcdefgh1234",
        "tup": ("x", "tok-abcdefgh1234"),
    }
    out = redact(obj)
    assert out == {
        "apiKey": REDACTED,
        "WANDB_API_KEY": REDACTED,
        "client_secret": REDACTED,
        "db_password": REDACTED,
        "hf_token": None,
        "pad_token_id": 2,
        "pad_token": "<pad>",
        "max_new_tokens": 8,
        "tokenizer": "gpt2",
        "secrets": REDACTED,
        "runs": [{"auth_token": REDACTED}],
        "cmd": f"curl -H {REDACTED}",
        "tup": ("x", REDACTED),
    }
    assert obj["apiKey"] == "k1"  # the input is not modified


def test_json_safe_scalars_and_arrays():
    torch = pytest.importorskip("torch")
    out = json_safe(
        {
            "t": torch.tensor(1.5),
            "i": np.int64(3),
            "f": np.float32(0.25),
            "b": np.bool_(True),
            "v": torch.tensor([1, 2]),
            "a": np.zeros(2),
            "p": Path("/x"),
            1: (1, 2),
        }
    )
    assert out == {"t": 1.5, "i": 3, "f": 0.25, "b": True, "v": [1, 2], "a": [0.0, 0.0], "p": "/x", "1": [1, 2]}
    assert json.loads(json.dumps(out)) == out


def test_trainer_callback_forwards_logs(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from tinyablate.train.common import MetricLoggerCallback

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    )
    data = [{"input_ids": torch.arange(8), "labels": torch.arange(8)} for _ in range(8)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        per_device_train_batch_size=4,
    )
    cell = tmp_path / "cell"
    with MetricLogger(cell, LoggerConfig(mode="disabled"), run_id="abc") as logger:
        callback = MetricLoggerCallback(logger)
        assert isinstance(callback, transformers.TrainerCallback)
        transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
        other_rank = SimpleNamespace(global_step=9, is_world_process_zero=False)
        callback.on_log(args, other_rank, None, logs={"loss": 9.0})
        callback.on_log(
            args, SimpleNamespace(global_step=9, is_world_process_zero=True), None, logs={"eval_accuracy": 0.75}
        )
    rows = read_metrics(cell)
    assert [r["step"] for r in rows] == [1, 2, 2, 9]
    assert all(r["train/loss"] > 0 and r["train/learning_rate"] > 0 for r in rows[:2])
    assert "train/train_runtime" in rows[2]
    assert {k: v for k, v in rows[3].items() if k != "time"} == {"step": 9, "eval/accuracy": 0.75}
