"""Analysis of sweep folders: tables, plots, HTML, RL-vs-SFT gap, errors, W&B summary run (CPU, fast)."""

import csv
import json
import math
from pathlib import Path

import pytest

from analysis.__main__ import main as cli_main
from analysis.data import aggregate, load_sweeps, params_to_reach, rl_sft_gap
from analysis.report import analyze
from analysis.wandb_summary import log_wandb_summary
from wandb_reader import find_offline_runs, read_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T_975_DF2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom (table value)
MODELS = {"qwen2.5-0.5b": ("qwen2", "0.5B"), "smollm2-135m": ("llama", "135M")}
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def make_result(
    *,
    model="qwen2.5-0.5b",
    algo="grpo",
    kind="tinylora",
    params=13,
    accuracy=0.5,
    seed=0,
    task="arithmetic",
    scorer="flexible",
    sweep="main",
    r=2,
    u=None,
    tie="all",
    sharing="tiled",
    precision="fp32",
    base=0.30,
    gpu_hours=0.01,
) -> dict:
    family, size = MODELS.get(model, ("qwen2", "?"))
    u = params if u is None else u
    nbytes = params * BYTES[precision]
    adapter_cfg = {"kind": kind, "r": r, "u": u, "tie": tie, "sharing": sharing, "precision": precision}
    label = f"{model}-{task}-{algo}-{kind}-r{r}-u{u}-t{tie}-{sharing}-{precision}-p{params}-s{seed}"
    reward = (
        {"first_loss": 2.0, "last_loss": 1.0}
        if algo == "sft"
        else {"first": 0.1, "last": accuracy, "mean_last10": accuracy, "max": 1.0}
    )
    return {
        "schema_version": 1,
        "cell_id": label,
        "status": "completed",
        "sweep": sweep,
        "config": {
            "model": {"name": model, "device": "cpu"},
            "adapter": {**adapter_cfg, "forward": "fused"},
            "task": {"name": task, "scorer": scorer},
            "algo": {"name": algo, "learning_rate": 0.002, "max_steps": 50, "micro_batch_size": 4},
            "eval": {"n": 100, "batch_size": 8},
            "seed": seed,
            "sweep": sweep,
            "output_dir": "runs",
        },
        "model": {"name": model, "family": family, "size": size, "n_params": 1000, "model_id": f"hub:{model}"},
        "adapter": {
            **adapter_cfg,
            "trainable_params": params,
            "trainable_bytes": nbytes,
            "n_modules": 168,
            "n_groups": 1,
        },
        "algo": {"name": algo, "learning_rate": 0.002, "steps": 0 if kind == "none" else 50},
        "task": {"name": task, "scorer": scorer},
        "metrics": {
            "accuracy": accuracy,
            "accuracy_strict": 0.0,
            "accuracy_flexible": accuracy,
            "n_eval": 100,
            "base_accuracy": base,
            "base_accuracy_strict": 0.0,
            "base_accuracy_flexible": base,
            "base_cached": True,
            "reward": None if kind == "none" else reward,
            "train_steps": 0 if kind == "none" else 50,
            "resumed_from_step": None,
        },
        "timing": {
            "wall_s": 3600 * gpu_hours,
            "train_s": 1.0,
            "eval_s": 1.0,
            "setup_s": 1.0,
            "n_gpus": 1,
            "gpu_hours": gpu_hours,
        },
        "provenance": {"git": "abc"},
    }


def write_cell(sweep_dir: Path, result: dict) -> Path:
    cell = sweep_dir / result["cell_id"]
    cell.mkdir(parents=True)
    (cell / "spec.json").write_text(json.dumps({"cell_id": result["cell_id"]}))
    (cell / "result.json").write_text(json.dumps(result))
    return cell


# The hand-checked group: Qwen, GRPO, TinyLoRA u=13 fp32 r=2, three seeds.
HAND = [0.50, 0.55, 0.62]


def accuracy_of(model, algo, params, seed):
    """Synthetic curve: GRPO climbs fast in log-params, SFT slowly; Llama a bit lower; seed noise."""
    gain = (0.09 if algo == "grpo" else 0.035) * math.log10(params + 1) * 10 / 3
    return round(min(0.95, 0.30 + gain - (0.05 if "smollm" in model else 0) + [-0.02, 0.0, 0.025][seed]), 4)


def build_main_sweep(root: Path) -> tuple:
    """2 families x 2 algos x 4 param counts x 3 seeds, plus extra axes, a failed, torn and running cell."""
    d = root / "main"
    n = 0
    for model in MODELS:
        write_cell(
            d,
            make_result(
                model=model,
                kind="none",
                params=0,
                accuracy=0.30 if "qwen" in model else 0.25,
                r=None,
                u=None,
                tie=None,
                sharing=None,
                gpu_hours=0.001,
            ),
        )
        n += 1
        for algo in ("grpo", "sft"):
            for params in (1, 13, 196, 5000):
                for seed in range(3):
                    acc = accuracy_of(model, algo, params, seed)
                    if (model, algo, params) == ("qwen2.5-0.5b", "grpo", 13):
                        acc = HAND[seed]
                    kind = "lora" if params == 5000 else "tinylora"
                    write_cell(
                        d, make_result(model=model, algo=algo, kind=kind, params=params, accuracy=acc, seed=seed)
                    )
                    n += 1
            # tiled vs structured at matched counts
            for sharing, acc in (("tiled", 0.6), ("structured", 0.55)):
                for seed in range(3):
                    write_cell(
                        d,
                        make_result(
                            model=model,
                            algo=algo,
                            params=336,
                            u=4,
                            tie=2,
                            sharing=sharing,
                            accuracy=acc + 0.01 * seed,
                            seed=seed,
                        ),
                    )
                    n += 1
    # precision axis (bf16: 16 bits/param) and frozen rank axis (r=1 vs r=2 at 13 params)
    for seed in range(3):
        write_cell(d, make_result(params=13, precision="bf16", accuracy=0.52 + 0.01 * seed, seed=seed))
        write_cell(d, make_result(params=13, r=1, accuracy=0.45 + 0.01 * seed, seed=seed))
        n += 2
    failed = d / "failed-cell"
    failed.mkdir()
    (failed / "result.json").write_text(
        json.dumps(
            {
                "schema_version": 1,
                "cell_id": "failed-cell",
                "status": "failed",
                "sweep": "main",
                "config": {},
                "error": {"type": "RuntimeError", "message": "CUDA out of memory", "traceback": "..."},
                "timing": {"wall_s": 12.0},
            }
        )
    )
    torn = d / "torn-cell"
    torn.mkdir()
    (torn / "result.json").write_text('{"schema_version": 1, "cell_id": "torn-cell", "sta')
    running = d / "running-cell"
    running.mkdir()
    (running / "spec.json").write_text(json.dumps({"cell_id": "running-cell"}))
    (running / "running.json").write_text(json.dumps({"pid": 1}))
    for junk in (".submitit/123", ".hydra"):
        (d / junk).mkdir(parents=True)
        (d / junk / "result.json").write_text("not a result")
    return d, n


def build_gsm_sweep(root: Path) -> Path:
    d = root / "gsm"
    for params, acc in ((0, 0.80), (1, 0.81), (13, 0.86), (196, 0.88)):
        kind = "none" if params == 0 else "tinylora"
        write_cell(d, make_result(task="gsm8k", sweep="gsm", kind=kind, params=params, accuracy=acc, base=0.80))
    return d


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    main_dir, n = build_main_sweep(root)
    gsm_dir = build_gsm_sweep(root)
    out = tmp_path_factory.mktemp("report")
    page = analyze([main_dir, gsm_dir], out)
    return {"page": page, "out": out, "n": n, "main": main_dir, "gsm": gsm_dir}


def read_csv(path: Path) -> list:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_summary_csv_numbers(report):
    rows = read_csv(report["out"] / "summary.csv")
    assert len(rows) == report["n"] + 4  # main completed + 4 gsm8k cells; failed/torn/running left out
    assert set(rows[0]) >= {
        "cell_id",
        "sweep",
        "task",
        "scorer",
        "model",
        "family",
        "size",
        "algo",
        "kind",
        "r",
        "u",
        "tie",
        "sharing",
        "precision",
        "seed",
        "trainable_params",
        "trainable_bytes",
        "bits_per_param",
        "accuracy",
        "gpu_hours",
        "wall_s",
    }
    bits = {(r["precision"], r["kind"]): r["bits_per_param"] for r in rows}
    assert float(bits[("bf16", "tinylora")]) == 16
    assert float(bits[("fp32", "tinylora")]) == 32
    assert bits[("", "none")] == ""  # 0 parameters: no bits per parameter
    hand = [
        r
        for r in rows
        if r["model"] == "qwen2.5-0.5b"
        and r["algo"] == "grpo"
        and r["trainable_params"] == "13"
        and r["precision"] == "fp32"
        and r["r"] == "2"
        and r["task"] == "arithmetic"
    ]
    assert sorted(float(r["accuracy"]) for r in hand) == HAND

    mean = sum(HAND) / 3
    sd = math.sqrt(sum((a - mean) ** 2 for a in HAND) / 2)
    half = T_975_DF2 * sd / math.sqrt(3)
    groups = read_csv(report["out"] / "summary_groups.csv")
    g = [
        g
        for g in groups
        if g["model"] == "qwen2.5-0.5b"
        and g["algo"] == "grpo"
        and g["trainable_params"] == "13"
        and g["precision"] == "fp32"
        and g["r"] == "2"
        and g["task"] == "arithmetic"
    ]
    assert len(g) == 1 and g[0]["n_seeds"] == "3"
    assert float(g[0]["accuracy_mean"]) == pytest.approx(mean, abs=1e-5)
    assert float(g[0]["ci_low"]) == pytest.approx(mean - half, abs=1e-5)
    assert float(g[0]["ci_high"]) == pytest.approx(mean + half, abs=1e-5)
    single = [g for g in groups if g["task"] == "gsm8k" and g["trainable_params"] == "13"][0]
    assert single["n_seeds"] == "1" and single["ci_low"] == "" and single["ci_high"] == ""  # one seed: no band


def test_summary_md_reports_gpu_hours_and_skipped_cells(report):
    md = (report["out"] / "summary.md").read_text()
    # running.json without a live holder of the cell's lock: the process is gone, the cell is interrupted
    assert "1 failed" in md and "1 interrupted" in md and "1 unreadable" in md
    assert "CUDA out of memory" in md and "not valid JSON" in md
    assert "## GPU-hours" in md
    main_rows = read_csv(report["out"] / "summary.csv")
    total = sum(float(r["gpu_hours"]) for r in main_rows if r["sweep"] == "main")
    assert f"| main | {report['n']} | {total:.3g} |" in md
    assert "| precision | bf16 | 3 |" in md  # per axis value


def test_plots_exist_and_html_references_them(report):
    out, page = report["out"], report["page"]
    assert page == out / "index.html"
    html = page.read_text()
    expected = [f"{key}__arithmetic-flexible.png" for key in ("params", "bytes", "sharing", "rank", "family", "rl_sft")]
    expected.append("params__gsm8k-flexible.png")
    for name in expected:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
        assert f"src='{name}'" in html
    # mixed tasks: one plot per task, never one curve; the gsm8k panels skip what does not vary there
    assert (out / "params__gsm8k-flexible.png").read_bytes() != (out / "params__arithmetic-flexible.png").read_bytes()
    assert not (out / "family__gsm8k-flexible.png").exists()
    assert "one model family only (qwen2)" in html
    assert "frozen rank r does not vary (r=2)" in html
    assert "needs GRPO and SFT cells" in html
    # the paper's reference is drawn on the gsm8k panel only
    assert html.count("13 → 91.8%") == 1
    assert "cells without a result" in html.lower() and "torn-cell" in html


def test_no_reference_and_wandb_from_analyze(report, tmp_path):
    page = analyze([report["gsm"]], tmp_path / "out", reference=False, wandb_mode="offline")
    assert "91.8" not in page.read_text()
    assert (tmp_path / "out" / "params__gsm8k-flexible.png").exists()
    runs = find_offline_runs(tmp_path / "out")
    assert len(runs) == 1 and read_run(runs[0]).group == "gsm"
    assert "W&amp;B summary run for sweep" in page.read_text()


def test_params_to_reach_interpolates_on_log_axis():
    sft = [(10, 0.2), (1000, 0.6)]
    need, how = params_to_reach(sft, 0.4)
    assert need == pytest.approx(100.0) and how == "interpolated"
    assert params_to_reach(sft, 0.7) == (None, "not reached")
    assert params_to_reach(sft, 0.1) == (10, "at or below the smallest count run")


def test_rl_sft_gap_on_constructed_sweep(tmp_path):
    d = tmp_path / "gap"
    for algo, params, acc in (("sft", 10, 0.2), ("sft", 1000, 0.6), ("grpo", 1, 0.4), ("grpo", 10, 0.7)):
        for seed, noise in enumerate((-0.01, 0.0, 0.01)):
            write_cell(d, make_result(algo=algo, params=params, accuracy=acc + noise, seed=seed, sweep="gap"))
    sweeps = load_sweeps([d])
    gap = rl_sft_gap(aggregate(sweeps.rows))
    assert [(g["params_rl"], round(g["accuracy"], 6)) for g in gap] == [(1, 0.4), (10, 0.7)]
    assert gap[0]["params_sft"] == pytest.approx(100.0) and gap[0]["ratio"] == pytest.approx(100.0)
    assert gap[1]["params_sft"] is None and gap[1]["how"] == "not reached"
    out = tmp_path / "out"
    page = analyze([d], out)
    md = (out / "summary.md").read_text()
    assert "| arithmetic | flexible | qwen2.5-0.5b | 1 | 40.0 | 100 | 100× |" in md
    assert "| 10 | 70.0 | not reached | not reached |" in md
    assert (out / "rl_sft__arithmetic-flexible.png").read_bytes()[:8] == PNG_MAGIC
    assert "not reached" in page.read_text()


def test_empty_or_missing_dir_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty_sweep"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_sweep: no results"):
        analyze([empty], tmp_path / "out")
    assert cli_main([str(empty), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "empty_sweep" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="nope: no such sweep folder"):
        analyze([tmp_path / "nope"], tmp_path / "out")
    # only failed or torn cells: nothing completed
    bad = tmp_path / "bad"
    (bad / "torn").mkdir(parents=True)
    (bad / "torn" / "result.json").write_text("{")
    with pytest.raises(ValueError, match="no completed results .*1 unreadable"):
        analyze([bad], tmp_path / "out")


def test_cli_writes_report(report, tmp_path, capsys):
    assert cli_main([str(report["gsm"]), "--out", str(tmp_path / "cli")]) == 0
    assert "index.html" in capsys.readouterr().out
    assert (tmp_path / "cli" / "summary.csv").exists()


def test_wandb_offline_summary_run(report, tmp_path, monkeypatch):
    fake_key = "fa6e" * 10
    monkeypatch.setenv("WANDB_API_KEY", fake_key)
    rows = load_sweeps([report["main"]]).rows
    path = log_wandb_summary(rows, "main", "offline", tmp_path)
    runs = find_offline_runs(tmp_path)
    assert len(runs) == 1 and path.parent == runs[0]
    run = read_run(runs[0])
    assert (run.project, run.group, run.job_type, run.exit_code) == ("tinyablate", "main", "analysis", 0)
    assert run.config["n_cells"] == len(rows)
    cells = run.summary["cells"]
    assert cells["_type"] == "table-file" and cells["nrows"] == len(rows)
    table = json.loads((runs[0] / "files" / cells["path"]).read_text())
    assert "line" in table["columns"] and "accuracy" in table["columns"] and len(table["data"]) == len(rows)
    lines = {row[table["columns"].index("line")] for row in table["data"]}
    assert lines == {"qwen2 · grpo", "qwen2 · sft", "llama · grpo", "llama · sft"}
    chart = run.summary["arithmetic-flexible/acc_vs_params_table"]
    assert chart["_type"] == "table-file"
    series = json.loads((runs[0] / "files" / chart["path"]).read_text())
    assert {row[series["columns"].index("lineKey")] for row in series["data"]} == {
        "qwen2 · qwen2.5-0.5b · grpo",
        "qwen2 · qwen2.5-0.5b · sft",
        "llama · smollm2-135m · grpo",
        "llama · smollm2-135m · sft",
    }
    for fam in ("qwen2", "llama"):
        for algo in ("grpo", "sft"):
            assert f"arithmetic-flexible/scatter/{fam}-{algo}_table" in run.summary
    assert any("cells" in row for row in run.history)
    for f in tmp_path.rglob("*"):  # the API key never reaches a file
        if f.is_file():
            assert fake_key.encode() not in f.read_bytes(), f


class _FakeRun:
    def __init__(self, result: dict, job_type: str):
        self.job_type = job_type
        self.config = {
            **result["config"],
            "cell_id": result["cell_id"],
            "model_family": result["model"]["family"],
            "model_size": result["model"]["size"],
            "trainable_params": result["adapter"]["trainable_params"],
            "trainable_bytes": result["adapter"]["trainable_bytes"],
        }
        m = result["metrics"]
        self.summary = {
            "eval/accuracy": {"last": m["accuracy"]},
            "eval/accuracy_flexible": m["accuracy_flexible"],
            "eval/accuracy_strict": m["accuracy_strict"],
            "eval/base_accuracy": m["base_accuracy"],
            "eval/n_eval": m["n_eval"],
            "train_steps": m["train_steps"],
            "gpu_hours": result["timing"]["gpu_hours"],
            "wall_s": result["timing"]["wall_s"],
            # as tinyablate.cell logs a collapse: its fields but the None ones
            **{f"collapse/{k}": v for k, v in (m.get("collapse") or {}).items() if v is not None},
        }


class _FakeApi:
    def __init__(self, runs):
        self._runs = runs
        self.asked = []

    def runs(self, path, filters):
        self.asked.append((path, filters))
        return self._runs


def test_results_read_back_from_wandb_runs_match_the_local_rows(tmp_path):
    from analysis.data import result_row
    from analysis.wandb_source import results_from_wandb
    from tinyablate.cell_folder import Result

    results = [make_result(params=p, accuracy=a, seed=s) for p, a, s in [(1, 0.3, 0), (13, 0.6, 1), (13, 0.7, 2)]]
    results.append(collapsed_result(params=13, accuracy=0.0, seed=3))
    results[-1]["metrics"]["collapse"]["stopped"] = True  # stopped early: read back as completed all the same
    results[-1]["algo"]["steps"] = results[-1]["metrics"]["train_steps"] = 8
    running = make_result(params=99)
    fake_running = _FakeRun(running, "grpo")
    fake_running.summary = {}  # no final accuracy yet: left out
    api = _FakeApi([_FakeRun(r, r["config"]["algo"]["name"]) for r in results] + [fake_running])
    got = results_from_wandb("ent/tinyablate", "sw", api=api)
    assert api.asked == [("ent/tinyablate", {"group": "sw"})] and len(got) == 4
    for local, remote in zip(results, got):
        a, b = result_row(Result.parse(local), "sw"), result_row(Result.parse(remote), "sw")
        for key in (
            "cell_id",
            "model",
            "family",
            "algo",
            "kind",
            "r",
            "u",
            "tie",
            "sharing",
            "precision",
            "seed",
            "trainable_params",
            "trainable_bytes",
            "accuracy",
            "accuracy_strict",
            "base_accuracy",
            "gpu_hours",
            "collapse_step",
        ):
            assert a[key] == b[key], key
    assert result_row(Result.parse(got[-1]), "sw")["collapse_step"] == 4


# --- transfer across tasks (result schema 2: metrics.tasks) ----------------------------------------
def with_tasks(result: dict, tasks: dict) -> dict:
    """A schema-2 result: `tasks` maps evaluation task -> (accuracy, base accuracy, n_eval)."""
    out = json.loads(json.dumps(result))
    out["schema_version"] = 2
    out["metrics"]["tasks"] = {
        name: {
            "scorer": "acc",
            "accuracy": acc,
            "base_accuracy": base,
            "delta": acc - base,
            "n_eval": n,
            "trained_on": name == result["task"]["name"],
            "base_cached": True,
            "final": {},
            "base": {},
        }
        for name, (acc, base, n) in tasks.items()
    }
    return out


def test_transfer_matrix_with_intervals_and_per_task_curves(tmp_path):
    from analysis.transfer import delta_interval, transfer_matrix

    d = tmp_path / "slim"
    deltas_mmlu = [0.02, -0.01, 0.05]
    for seed, dm in enumerate(deltas_mmlu):  # three seeds trained on gsm8k: a t-interval over cells
        base = make_result(task="gsm8k", scorer="strict", seed=seed, accuracy=0.6, params=13)
        write_cell(d, with_tasks(base, {"gsm8k": (0.6, 0.5, 100), "mmlu_cs": (0.40 + dm, 0.40, 412)}))
    one = make_result(task="mmlu_cs", scorer="acc", seed=0, accuracy=0.45, params=196)
    write_cell(d, with_tasks(one, {"mmlu_cs": (0.45, 0.40, 412), "gsm8k": (0.45, 0.5, 100)}))
    v1 = make_result(task="arithmetic", seed=0, accuracy=0.7, params=1)  # schema 1: its own task alone
    write_cell(d, v1)
    qlora = with_tasks(
        make_result(task="gsm8k", scorer="strict", kind="lora", params=20_185_088, accuracy=0.6),
        {"gsm8k": (0.6, 0.5, 100), "mmlu_cs": (0.3, 0.4, 412)},
    )
    qlora["config"]["model"]["quantization"] = qlora["model"]["quantization"] = "nf4"
    write_cell(d, qlora)
    sweeps = load_sweeps([d])
    by_adapter = {m["adapter"]: m for m in transfer_matrix(sweeps.rows)}
    assert sorted(by_adapter) == ["lora+nf4", "tinylora"]  # one matrix per adapter: QLoRA apart
    assert by_adapter["lora+nf4"]["entries"][("gsm8k", "mmlu_cs")]["mean"] == pytest.approx(-0.1)
    m = by_adapter["tinylora"]
    assert m["train_tasks"] == ["arithmetic", "gsm8k", "mmlu_cs"]
    entry = m["entries"][("gsm8k", "mmlu_cs")]
    mean = sum(deltas_mmlu) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in deltas_mmlu) / 2)
    assert entry["mean"] == pytest.approx(mean)
    assert entry["high"] - entry["mean"] == pytest.approx(T_975_DF2 * sd / math.sqrt(3))
    single = m["entries"][("mmlu_cs", "gsm8k")]  # one cell: independent-binomial interval
    half = 1.96 * math.sqrt(0.45 * 0.55 / 100 + 0.5 * 0.5 / 100)
    assert single["mean"] == pytest.approx(-0.05) and single["low"] == pytest.approx(-0.05 - half)
    assert m["entries"][("arithmetic", "arithmetic")]["mean"] == pytest.approx(0.7 - 0.3)
    assert delta_interval([{"delta": None}])[0] is None

    out = tmp_path / "report"
    analyze([d], out)
    with open(out / "transfer.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 + 2 + 1 + 2 and {r["eval_task"] for r in rows} == {"gsm8k", "mmlu_cs", "arithmetic"}
    for name in ("transfer__qwen2.5-0.5b-grpo-tinylora.png", "task_curves__qwen2.5-0.5b.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    summary = (out / "summary.md").read_text()
    assert "## Transfer: training task x evaluation task" in summary and f"{100 * mean:+.1f}" in summary
    assert "transfer__qwen2.5-0.5b-grpo-tinylora.png" in (out / "index.html").read_text()
    log_wandb_summary(sweeps.rows, "main", "offline", tmp_path / "wb")  # the W&B summary run gets the table
    [run_dir] = find_offline_runs(tmp_path / "wb")
    transfer = read_run(run_dir).summary["transfer"]
    assert transfer["_type"] == "table-file" and transfer["nrows"] == 11


def test_no_transfer_section_without_cross_task_cells(tmp_path):
    d = tmp_path / "plain"
    write_cell(d, make_result(seed=0))
    analyze([d], tmp_path / "report")
    assert not (tmp_path / "report" / "transfer.csv").exists()
    assert "Transfer" not in (tmp_path / "report" / "summary.md").read_text()


# --- collapsed cells: drawn and counted, never averaged (tinyablate/train/collapse.py) -----------------------------
def collapsed_result(collapse_step=4, recovered_step=None, **kw) -> dict:
    """A completed GRPO result whose training collapsed at `collapse_step` (recovered at `recovered_step`, if set)."""
    out = make_result(**kw)
    out["metrics"]["collapse"] = {
        "step": collapse_step,
        "detected_step": collapse_step + 4,
        "reason": "empty_completions",
        "stopped": False,
        "recovered_step": recovered_step,
    }
    return out


def test_collapsed_cells_are_drawn_counted_and_left_out_of_the_means(tmp_path, monkeypatch):
    import analysis.plots
    from analysis.compare import comparisons
    from analysis.data import measured

    d = tmp_path / "collapse"
    for seed, acc in enumerate([0.60, 0.70]):  # GRPO u=13: two seeds learn, the third collapses to 0%
        write_cell(d, make_result(params=13, accuracy=acc, seed=seed))
    write_cell(d, collapsed_result(params=13, accuracy=0.0, seed=2))
    write_cell(d, collapsed_result(params=196, accuracy=0.01, seed=0, collapse_step=3))  # its only seed collapsed
    write_cell(d, collapsed_result(params=196, accuracy=0.66, seed=1, recovered_step=9))  # recovered: it counts
    for seed, acc in enumerate([0.40, 0.44, 0.48]):
        write_cell(d, make_result(algo="sft", params=13, accuracy=acc, seed=seed))
    figures = {}
    save = analysis.plots._save
    monkeypatch.setattr(
        analysis.plots, "_save", lambda fig, out_dir, name: figures.setdefault(name, fig) and save(fig, out_dir, name)
    )
    out = tmp_path / "report"
    analyze([d], out)

    cells = {r["cell_id"]: r for r in read_csv(out / "summary.csv")}
    assert len(cells) == 8 and sorted(r["collapse_step"] for r in cells.values() if r["collapse_step"]) == ["3", "4"]
    groups = {(g["algo"], g["trainable_params"]): g for g in read_csv(out / "summary_groups.csv")}
    grpo13 = groups[("grpo", "13")]
    assert (grpo13["n_seeds"], grpo13["n_collapsed"]) == ("2", "1")
    assert float(grpo13["accuracy_mean"]) == pytest.approx(0.65)  # 0.60 and 0.70: the collapsed 0% is not in it
    assert float(groups[("grpo", "196")]["accuracy_mean"]) == pytest.approx(0.66)  # the recovered seed alone
    assert groups[("grpo", "196")]["n_collapsed"] == "1"
    md = (out / "summary.md").read_text()
    assert "Cells: 8 completed (2 of them collapsed, left out of the means), 0 failed" in md
    assert "## Collapsed cells (left out of the means)" in md and "every completion empty (the end token first)" in md
    listed = [line for line in md.split("## Collapsed cells")[1].splitlines() if line.startswith("| main | ")]
    assert [line.split(" | ")[2:4] for line in listed] == [["0.0", "4"], ["1.0", "3"]]  # not the recovered cell
    html = (out / "index.html").read_text()
    assert "2 completed cell(s) collapsed in training" in html and "id='collapsed'" in html
    params = figures["params__arithmetic-flexible.png"]
    [marked] = [c for c in params.axes[0].collections if c.get_label().startswith("collapsed in training (2 cells")]
    assert sorted(map(tuple, marked.get_offsets().tolist())) == [(13.0, 0.0), (196.0, 1.0)]  # where they ended
    grpo_line = [ln for ln in params.axes[0].lines if ln.get_label().endswith("· grpo")][0]
    assert list(grpo_line.get_ydata()) == pytest.approx([65.0, 66.0])  # the means drawn: no collapsed seed in them
    assert "Black × are the 2 cells" in html
    rows = load_sweeps([d]).rows
    [algo13] = [c for c in comparisons(measured(rows)) if c["axis"] == "algo"]
    assert (algo13["n_a"], algo13["n_b"]) == (2, 3)  # grpo's two seeds that did not collapse, against sft's three
    log_wandb_summary(rows, "main", "offline", tmp_path / "wb")
    [run_dir] = find_offline_runs(tmp_path / "wb")
    assert read_run(run_dir).summary["n_collapsed"] == 2
