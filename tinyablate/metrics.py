"""One metrics sink per sweep cell: an append-only `metrics.jsonl`, mirrored to W&B.

`MetricLogger` writes every `log(metrics, step)` call as one JSON line in
`<cell_dir>/metrics.jsonl` and sends the same call to a W&B run (offline by default; nothing is
sent anywhere unless `mode="online"`). `summary()` sets W&B summary values and keeps them in
`<cell_dir>/summary.json`. The W&B run id comes from the cell id (`wandb_run_id`), so a
requeued cell resumes its run. Everything written goes through `redact`, so API keys and
tokens never reach a file. `train.common.MetricLoggerCallback` plugs the logger into a
transformers/TRL Trainer (whose own `report_to` stays "none"). Settings: `LoggerConfig`
(tinyablate/config/logger.py).
"""

import dataclasses
import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .cell_folder import METRICS_FILE, SUMMARY_FILE
from .config import LoggerConfig
from .files import read_json, write_json_atomic, write_text_atomic
from .wandb_files import wait_for_exit_record

# How long `close` waits for wandb-core to flush the run's `.wandb` file after finish().
FINISH_FLUSH_TIMEOUT_S = 30.0
# Keys of a metrics line that `log` fills itself; a metric may not use them.
RESERVED_KEYS = ("step", "time")
# Metrics whose W&B summary keeps the last and the best value ({"last": v, "max": m}):
# wandb-core stores a define_metric summary as such a dict, not as a bare number.
SUMMARY_METRICS = {"eval/accuracy": "last,max"}
# W&B run ids: at most 64 characters; we use only [a-z0-9] (wandb_run_id produces these).
_RUN_ID_RE = re.compile(r"^[a-z0-9]{1,64}$")

REDACTED = "***REDACTED***"
# A key names a secret when a word of it (split at non-letters and camelCase) is one of these.
SECRET_KEY_RE = re.compile(r"(?i)(?:^|[^a-z])(api[_-]?keys?|token|secrets?|passwords?|passwd)(?:$|[^a-z])")
# Tokenizer special-token fields ("pad_token": "<pad>") are not secrets.
_BENIGN_KEY_RE = re.compile(r"(?i)^(bos|eos|pad|unk|sep|cls|mask)_token$")
# Environment secrets shorter than this are not scrubbed from strings (too many false hits).
_MIN_SECRET_LEN = 8


def wandb_run_id(cell_id: str) -> str:
    """Deterministic W&B run id for a sweep cell: a readable [a-z0-9] slug plus a hash.

    At most 56 characters. The hash is of the exact cell id, so cell ids that differ only in
    punctuation or case ("lr=1e-3" vs "lr1e3") still get different run ids.
    """
    if not isinstance(cell_id, str) or not cell_id:
        raise ValueError(f"cell_id={cell_id!r} is invalid: expected a non-empty string.")
    slug = re.sub(r"[^a-z0-9]", "", cell_id.lower())[:40]
    return slug + hashlib.sha256(cell_id.encode("utf-8")).hexdigest()[:16]


def json_safe(value: Any) -> Any:
    """A JSON-serializable copy of `value`.

    Tensor / numpy scalars become Python numbers (via `.item()`), arrays and tensors become
    lists, mappings and dataclasses become dicts with string keys, tuples and sets become lists,
    anything else becomes `str(value)`. NaN and inf stay floats (metrics.jsonl writes them as strings: jsonl_line).
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return json_safe(value.item())
    if callable(getattr(value, "tolist", None)):
        return json_safe(value.tolist())
    return str(value)


# metrics.jsonl is strict JSON: a non-finite number is written as one of these strings and read back as the
# float (`read_metrics`); W&B receives the float itself.
NONFINITE_STRINGS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def jsonl_line(row: Any) -> str:
    """One strict-JSON line of `row` (NaN, inf and -inf as the strings of NONFINITE_STRINGS)."""
    return json.dumps(_map_leaves(row, _encode_nonfinite), allow_nan=False) + "\n"


def _encode_nonfinite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _decode_nonfinite(value: Any) -> Any:
    return NONFINITE_STRINGS[value] if isinstance(value, str) and value in NONFINITE_STRINGS else value


def _map_leaves(value: Any, fn) -> Any:
    """`value` with `fn` applied to every leaf inside its dicts and lists."""
    if isinstance(value, dict):
        return {k: _map_leaves(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_leaves(v, fn) for v in value]
    return fn(value)


def redact(obj: Any) -> Any:
    """A copy of `obj` with secrets masked as REDACTED.

    Under a key that names a secret (`SECRET_KEY_RE`: api_key, WANDB_API_KEY, hf_token,
    client_secret, password, apiKey...) every value except numbers, booleans and None is masked
    (so `pad_token_id: 0` stays, `hf_token: "hf_..."` does not). Keys like `max_new_tokens` or
    `tokenizer` are not secrets. Also, any string containing the value of a secret-named
    environment variable (e.g. $WANDB_API_KEY) has it replaced, wherever it appears.
    """
    return _redact(obj, _env_secrets())


def _redact(obj: Any, secrets: List[str]) -> Any:
    """`redact` with the environment secrets already collected."""
    if isinstance(obj, str):
        return _scrub(obj, secrets)
    if isinstance(obj, Mapping):
        return {_scrub_key(k, secrets): _redact_item(k, v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_redact(v, secrets) for v in obj)
    return obj


def _redact_item(key: Any, value: Any, secrets: List[str]) -> Any:
    """The redacted value stored under `key`."""
    if is_secret_key(key) and not (value is None or isinstance(value, (bool, int, float))):
        return REDACTED
    return _redact(value, secrets)


def _scrub_key(key: Any, secrets: List[str]) -> Any:
    """A dict key with environment secrets replaced (non-string keys unchanged)."""
    return _scrub(key, secrets) if isinstance(key, str) else key


def is_secret_key(key: Any) -> bool:
    """True when a dict key names a secret (see `redact`)."""
    if not isinstance(key, str) or _BENIGN_KEY_RE.match(key):
        return False
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key)
    return SECRET_KEY_RE.search(words) is not None


def _env_secrets() -> List[str]:
    """Values of secret-named environment variables, longest first."""
    values = {v for k, v in os.environ.items() if is_secret_key(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def _scrub(text: str, secrets: List[str]) -> str:
    """`text` with every occurrence of each secret replaced by REDACTED."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


class MetricLogger:
    """The metrics sink of one sweep cell (use as a context manager, or call `close`).

    Args:
        cell_dir: the cell's output folder (created if missing).
        cfg: the logger config (validated here); None uses `LoggerConfig()`.
        run_id: the W&B run id, from `wandb_run_id(cell_id)`; the same id resumes the run.
        group, job_type, name: W&B run group (e.g. the sweep), job type (e.g. "train"), and
            display name (e.g. the cell id).
        config: the cell's resolved config, stored (redacted) as the W&B run config.
    """

    def __init__(
        self,
        cell_dir: Union[str, Path],
        cfg: Optional[LoggerConfig] = None,
        *,
        run_id: str,
        group: Optional[str] = None,
        job_type: Optional[str] = None,
        name: Optional[str] = None,
        config: Optional[Mapping] = None,
    ) -> None:
        self.cfg = cfg if cfg is not None else LoggerConfig()
        self.cfg.validate()
        if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
            raise ValueError(
                f"run_id={run_id!r} is invalid: expected 1-64 chars of [a-z0-9] "
                "(use tinyablate.metrics.wandb_run_id(cell_id))."
            )
        self.cell_dir = Path(cell_dir)
        self.cell_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.cell_dir / METRICS_FILE
        self.summary_path = self.cell_dir / SUMMARY_FILE
        self.run_id = run_id
        self._summary = _read_json_dict(self.summary_path)
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        self._closed = False
        # True while W&B holds an uncommitted history row (a step is committed only when a
        # later step is logged, or by an explicit commit).
        self._row_pending = False
        self.run = None
        # The run's `run-<id>.wandb` file (None when W&B is disabled).
        self.run_file: Optional[Path] = None
        if self.cfg.mode != "disabled":
            safe_config = redact(json_safe(dict(config or {})))
            try:
                self.run = self._init_wandb(group, job_type, name, safe_config)
            except BaseException:
                self._file.close()
                raise
            self.run_file = Path(self.run.settings.sync_file).resolve()

    @property
    def wandb_dir(self) -> Optional[Path]:
        """The folder holding W&B's `wandb/` folder (None when W&B is disabled)."""
        if self.cfg.mode == "disabled":
            return None
        return Path(self.cfg.dir) if self.cfg.dir else self.cell_dir

    def _init_wandb(self, group, job_type, name, config: Dict[str, Any]):
        """Start (or resume) this cell's W&B run, with our summary metrics defined."""
        import wandb  # only when W&B is on: importing it costs ~0.5 s of every cell's start

        self.wandb_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            group=group,
            job_type=job_type,
            name=name,
            id=self.run_id,
            resume="allow",
            config=config,
            tags=list(self.cfg.tags),
            mode=self.cfg.mode,
            dir=str(self.wandb_dir),
            # A process may run several cells: each logger owns its run, never wandb.run.
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, disable_code=True, **_api_key(self.cfg)),
        )
        for metric, summary in SUMMARY_METRICS.items():
            run.define_metric(metric, summary=summary)
        return run

    def define_metric(self, name: str, **kwargs: Any) -> None:
        """Pass-through to the W&B run's `define_metric` (no-op when W&B is disabled)."""
        if self.run is not None:
            self.run.define_metric(name, **kwargs)

    def log(self, metrics: Mapping, step: int) -> None:
        """Append `{"step", "time", **metrics}` to metrics.jsonl and log it to W&B at `step`.

        W&B merges calls with the same step into one history row and drops steps lower than
        one already committed; the JSONL keeps every call.
        """
        self._check_open()
        row = redact(json_safe(dict(metrics)))
        clash = [k for k in RESERVED_KEYS if k in row]
        if clash:
            raise ValueError(f"metric names {clash} are reserved by MetricLogger.log")
        step = int(step)
        self._file.write(jsonl_line({"step": step, "time": time.time(), **row}))
        self._file.flush()
        if self.run is not None:
            self.run.log(row, step=step)
            self._row_pending = True

    def table(self, key: str, columns: List[str], rows: List[list], step: int) -> None:
        """Log a table at `step`: a W&B Table, and `{key: {"columns", "data"}}` in metrics.jsonl.
        Call it before `summary` (which closes the step in W&B)."""
        self._check_open()
        data = redact(json_safe([list(row) for row in rows]))
        self._file.write(
            jsonl_line({"step": int(step), "time": time.time(), key: {"columns": list(columns), "data": data}})
        )
        self._file.flush()
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=list(columns), data=data)}, step=int(step))
            self._row_pending = True

    def summary(self, values: Mapping) -> None:
        """Set W&B summary values and merge them into summary.json (kept across resumes).

        The pending W&B history row is committed first, so these values are not overwritten
        by that row when the run finishes; after this call W&B drops further logs at that
        same step (the JSONL still gets them), so call it once the step is complete.
        """
        self._check_open()
        values = redact(json_safe(dict(values)))
        self._summary.update(values)
        write_json_atomic(self.summary_path, self._summary)
        if self.run is not None:
            if self._row_pending:
                self.run.log({}, commit=True)
                self._row_pending = False
            self.run.summary.update(values)

    def close(self, exit_code: int = 0) -> None:
        """Close metrics.jsonl and finish the W&B run with `exit_code`. Safe to call twice.

        Returns once the run's `.wandb` file is complete (wandb-core may still be writing it
        when `finish()` returns), so the cell's files can be read or copied right away.
        """
        if self._closed:
            return
        self._closed = True
        self._file.close()
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            if not wait_for_exit_record(self.run_file, FINISH_FLUSH_TIMEOUT_S):
                warnings.warn(
                    f"W&B did not finish writing {self.run_file} within {FINISH_FLUSH_TIMEOUT_S:.0f} s",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def _check_open(self) -> None:
        """Raise RuntimeError once the logger is closed."""
        if self._closed:
            raise RuntimeError(f"MetricLogger for {self.cell_dir} is closed")

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(0 if exc_type is None else 1)
        return False


class NullLogger:
    """What ranks other than 0 log to: nothing (rank 0's MetricLogger is the cell's one sink)."""

    def log(self, metrics: Mapping, step: int) -> None:
        pass

    def table(self, key: str, columns: List[str], rows: List[list], step: int) -> None:
        pass

    def summary(self, values: Mapping) -> None:
        pass

    def close(self, exit_code: int = 0) -> None:
        pass

    def __enter__(self) -> "NullLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        return False


def read_metrics(cell_dir: Union[str, Path]) -> List[Dict[str, Any]]:
    """Every line of `<cell_dir>/metrics.jsonl` (a torn last line from a crash is skipped), non-finite values
    as floats again (see NONFINITE_STRINGS); older files with bare NaN / Infinity tokens read the same."""
    path = Path(cell_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(_map_leaves(json.loads(line), _decode_nonfinite))
        except json.JSONDecodeError:
            continue
    return rows


def _api_key(cfg: LoggerConfig) -> Dict[str, str]:
    """{"api_key": the key in logger.api_key_file} (read by this process, never put in its environment)."""
    if cfg.api_key_file is None:
        return {}
    return {"api_key": Path(cfg.api_key_file).expanduser().read_text().strip()}


def truncate_metrics(cell_dir: Union[str, Path], through_step: Optional[int]) -> List[Dict[str, Any]]:
    """Before a cell starts again: keep the rows of steps 0..`through_step` (the base evaluation and what its
    checkpoint holds; None keeps none: training starts over), so the steps it re-runs appear once and the
    steps of metrics.jsonl ascend across resumes. Returns the rows kept."""
    path = Path(cell_dir) / METRICS_FILE
    if not path.exists():
        return []
    keep = [
        row
        for row in read_metrics(cell_dir)
        if isinstance(row.get("step"), int) and through_step is not None and 0 <= row["step"] <= through_step
    ]
    write_text_atomic(path, "".join(jsonl_line(row) for row in keep))
    return keep


def _read_json_dict(path: Path) -> Dict[str, Any]:
    """The dict stored in `path`, or {} when missing or unreadable."""
    data = read_json(path)
    return data if isinstance(data, dict) else {}


def rewrite_trainer_logs(logs: Mapping) -> Dict[str, Any]:
    """Name trainer logs like transformers' W&B integration: "eval_x" -> "eval/x",
    "test_x" -> "test/x", anything else "x" -> "train/x"."""
    out = {}
    for key, value in logs.items():
        for prefix in ("eval_", "test_"):
            if key.startswith(prefix):
                out[f"{prefix[:-1]}/{key[len(prefix) :]}"] = value
                break
        else:
            out[f"train/{key}"] = value
    return out
