"""The family study's analysis: normalized gain against LoRA, half-LoRA budget, figure, tables, W&B (CPU, fast)."""

import csv
import json
from pathlib import Path

import pytest

from analysis.compare import normalized_gain
from analysis.data import aggregate, load_sweeps
from analysis.family import FAMILY_COLUMNS, family_gains
from analysis.plots import family_figure, model_colors
from analysis.report import analyze
from analysis.wandb_summary import log_wandb_summary
from test_analysis import make_result, write_cell
from wandb_reader import find_offline_runs, read_run

QWEN, LLAMA = "qwen2.5-0.5b", "smollm2-135m"
N = 100  # held-out problems per cell
NONE = dict(kind="none", params=0, r=None, u=None, tie=None, sharing=None)


def cell(sweep: Path, correct: int, seed: int = 0, **kw) -> None:
    """A completed cell right on its first `correct` of N problems, with its per-problem records."""
    result = make_result(sweep="family", accuracy=correct / N, seed=seed, **kw)
    folder = write_cell(sweep, result)
    records = [{"id": f"p-{i}", "flexible": i < correct, "strict": False} for i in range(N)]
    (folder / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def seeds(sweep: Path, correct: int, **kw) -> None:
    """Three seeds one problem apart around `correct` (mean exactly correct / N)."""
    for seed, delta in enumerate((-1, 0, 1)):
        cell(sweep, correct + delta, seed=seed, **kw)


def build_family_sweep(root: Path) -> Path:
    """By hand (problems right of 100):
    qwen grpo:  base 20, LoRA r=1 60 -> TinyLoRA 30, 45, 50 at u=1, 4, 16: gains 0.25, 0.625, 0.75; half at 4
    llama grpo: base 30, LoRA r=1 50 -> TinyLoRA 32, 36, 38: gains 0.1, 0.3, 0.4; half not reached
    qwen sft:   LoRA r=1 18 < base 20: undefined (LoRA gains -2 points)
    llama sft:  no LoRA cell: undefined
    """
    d = root / "family"
    for model, base in ((QWEN, 20), (LLAMA, 30)):
        cell(d, base, model=model, base=base / N, **NONE)
    curves = {
        (QWEN, "grpo"): (60, (30, 45, 50)),
        (LLAMA, "grpo"): (50, (32, 36, 38)),
        (QWEN, "sft"): (18, (25, 30, 31)),
        (LLAMA, "sft"): (None, (31, 33, 34)),
    }
    for (model, algo), (lora, tiny) in curves.items():
        base = 0.2 if model == QWEN else 0.3
        if lora is not None:
            lora_params = 540_672 if model == QWEN else 460_800
            seeds(d, lora, model=model, algo=algo, kind="lora", r=1, params=lora_params, base=base)
        for u, correct in zip((1, 4, 16), tiny):
            seeds(d, correct, model=model, algo=algo, params=u, base=base)
    return d


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    sweep = build_family_sweep(tmp_path_factory.mktemp("runs"))
    rows = load_sweeps([sweep]).rows
    return {"sweep": sweep, "rows": rows, "settings": aggregate(rows)}


def by_key(gains: list) -> dict:
    return {(g["model"], g["algo"], g["params"]): g for g in gains}


def test_normalized_gain_and_half_lora_budget_by_hand(family):
    gains = by_key(family_gains(family["rows"], family["settings"]))
    assert len(gains) == 12 and all(g["n_seeds"] == 3 for g in gains.values())
    for u, want in zip((1, 4, 16), (0.25, 0.625, 0.75)):
        g = gains[(QWEN, "grpo", u)]
        assert g["gain"] == pytest.approx(want)
        assert g["gain_low"] < g["gain"] < g["gain_high"] and g["note"] == ""
        assert (g["lora_r"], g["lora_params"], g["half_lora_params"]) == (1, 540_672, 4)
        assert g["base_accuracy"] == pytest.approx(0.2) and g["lora_accuracy"] == pytest.approx(0.6)
    for u, want in zip((1, 4, 16), (0.1, 0.3, 0.4)):
        g = gains[(LLAMA, "grpo", u)]
        assert g["gain"] == pytest.approx(want) and g["half_lora_params"] is None  # never half of LoRA's gain
    for u in (1, 4, 16):
        g = gains[(QWEN, "sft", u)]  # LoRA below the base: no division, and the row says why
        assert g["gain"] is None and g["gain_low"] is None and g["half_lora_params"] is None
        assert g["note"].startswith("undefined: LoRA r=1 gains -2.0 points over the base (<= 0)")
        assert gains[(LLAMA, "sft", u)]["note"] == "undefined: no LoRA cell of this model and algorithm"


def test_normalized_gain_interval_by_hand():
    """400 shared problems, one seed each: the base right on the first 80, TinyLoRA on the first 160, LoRA on the
    first 240. A resample's gain is X / (X + Y), X and Y the drawn problems of [80, 160) and [160, 240): about
    Binomial(160, ½) / 160, so 0.5 ± 1.96 · sqrt(0.25 / 160) = 0.5 ± 0.077."""
    base, tiny, lora = ([[1.0] * k + [0.0] * (400 - k)] for k in (80, 160, 240))
    gain, low, high = normalized_gain(tiny, lora, base, draws=20000)
    assert gain == pytest.approx(0.5)
    assert low == pytest.approx(0.5 - 0.077, abs=0.012) and high == pytest.approx(0.5 + 0.077, abs=0.012)
    # LoRA 3 problems above the base: its own gain's interval reaches 0, so the share's interval is unbounded
    near = [[1.0] * 53 + [0.0] * 47]
    assert normalized_gain([[1.0] * 52 + [0.0] * 48], near, [[1.0] * 50 + [0.0] * 50])[1:] == (None, None)
    with pytest.raises(ValueError, match="<= 0"):
        normalized_gain(near, [[1.0] * 50 + [0.0] * 50], near)  # LoRA below the base: never divided by


def test_family_figure_has_a_panel_per_algorithm_and_a_colour_per_model(family):
    settings = family["settings"]
    colors = model_colors(settings)
    fig = family_figure(family["rows"], settings, "arithmetic", "flexible", colors)
    assert [ax.get_title() for ax in fig.axes] == ["grpo", "sft"]
    for ax in fig.axes:
        curves = {line.get_label(): line.get_color() for line in ax.get_lines() if "TinyLoRA" in line.get_label()}
        assert curves == {f"qwen2 · {QWEN} · TinyLoRA": colors[QWEN], f"llama · {LLAMA} · TinyLoRA": colors[LLAMA]}
        assert ax.get_xscale() == "log" and "0\n(base)" in [t.get_text() for t in ax.get_xticklabels()]
    assert colors[QWEN] != colors[LLAMA]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert f"qwen2 · {QWEN} · LoRA" in labels and f"llama · {LLAMA} · base (0 params)" in labels


def test_family_table_in_page_markdown_and_csv(family, tmp_path):
    page = analyze([family["sweep"]], tmp_path)
    assert (tmp_path / "family__arithmetic-flexible.png").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "family.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == FAMILY_COLUMNS and len(rows) == 12
    qwen4 = next(r for r in rows if (r["model"], r["algo"], r["params"]) == (QWEN, "grpo", "4"))
    assert float(qwen4["gain"]) == pytest.approx(0.625) and qwen4["half_lora_params"] == "4"
    md = (tmp_path / "summary.md").read_text()
    assert "## Family study: share of LoRA's gain" in md and "bootstrap over seeds and problems" in md
    assert f"| arithmetic | flexible | {QWEN} | grpo | 4 | 45.0 | 3 | 20.0 | 1 (540,672) | 60.0 | 0.62 | [" in md
    assert f"| {LLAMA} | grpo | 16 | 38.0 | 3 | 30.0 | 1 (460,800) | 50.0 | 0.40 | [" in md
    assert "| not reached |" in md and "| undefined |" in md
    html = page.read_text()
    assert "Share of LoRA's gain per budget</h3>" in html and "gains -2.0 points over the base" in html
    assert html.index("family__arithmetic-flexible.png") < html.index("Share of LoRA's gain")


def test_wandb_summary_gets_the_family_view(family, tmp_path):
    log_wandb_summary(family["rows"], "family", "offline", tmp_path)
    [run_dir] = find_offline_runs(tmp_path)
    summary = read_run(run_dir).summary
    image = summary["arithmetic-flexible/family"]
    assert image["_type"] == "image-file" and (run_dir / "files" / image["path"]).read_bytes()[:4] == b"\x89PNG"
    table = summary["arithmetic-flexible/family_gain"]
    assert table["_type"] == "table-file" and table["nrows"] == 12
    data = json.loads((run_dir / "files" / table["path"]).read_text())
    assert data["columns"] == FAMILY_COLUMNS
    assert summary[f"half_lora/arithmetic-flexible/{QWEN} · grpo"] == 4
    assert summary[f"half_lora/arithmetic-flexible/{LLAMA} · grpo"] == "not reached"
    assert summary[f"half_lora/arithmetic-flexible/{QWEN} · sft"] == "undefined"
