"""GPU-hours of a cell before it runs: a cost model over a measured throughput table, calibrated by completed cells.

    from tinyablate.cost import load_table, estimate_cell
    cost = estimate_cell(spec, load_table().device("h200"))   # CellCost: gpu_hours, wall_s, parts (seconds)

The model (standard library only: the launcher's dry run imports it). A cell is setup + training steps +
evaluation, each from the model's shape (`tinyablate.config.model.SHAPES`) and the cell's settings:
- GRPO step = rollout + training. Rollout = prefill (forward FLOPs of the prompts) + `max_completion_length`
  decode steps of `decode_s_per_layer x layers` each: HF generate is bound by per-step launch latency, not
  by the batch (benchmarks/RESULTS.md: 256 decode steps of ~22 ms whether a rank holds 128 or 256 rows).
  Training = 4 x matmul FLOPs per token (forward 2N, backward through the frozen weights 2N: input
  gradients only) + attention, over prompts x generations x (prompt + completion) tokens, at the
  device's effective training FLOP/s. With `num_iterations = k > 1` TRL samples once every k steps and adds
  a forward for the old log-probs.
- SFT step = training over prompts_per_step x (prompt + reference solution) tokens (at most max_length).
- The decode rate is the generator's that `algo.rollout_engine` / `eval.engine` pick: tinyablate's graph
  engine ("auto", "graph") where the table has its measurement (`decode_engine`), else HF generate's.
- Evaluation = ceil(problems / (batch x ranks)) batches of `max_new_tokens` decode steps (+ pass@k
  samples), batch = eval.engine_batch_size through the engine, eval.batch_size through HF; the base evaluation is cached, so it is counted once per sweep (`base_eval_s`), not per cell.
  A multiple-choice task (mmlu_cs, hellaswag) is forward FLOPs over its rows (no decoding); every task of
  `eval.tasks` adds its evaluation.
- A quantized base (model.quantization) is priced as the unquantized one: its step time is not measured here
  (benchmarks/qlora_bench.py measures it); calibration by completed cells corrects it.
- Setup = a process's start-up overhead + the frozen basis (SVD) per adapted module; weight loading is not
  modelled (not measured).
- gpus = N: training / (N x the measured data-parallel efficiency); rollout decode steps unchanged
  (latency-bound); evaluation batches / N. GPU-hours = N x wall / 3600.
`algo.micro_batch_size` is not modelled: the training rate is the one measured (micro-batches of 8).
Completion lengths are the configured maxima (HF generate stops a batch early only when every row has
ended), so an estimate is an upper bound until completed cells calibrate it (`calibrate`).

The throughput table (`THROUGHPUT_FILE`, JSON) holds, per device kind, the measurements the coefficients
are derived from, each with its device, date, command and where it is recorded; benchmarks/dp_bench.py
`--throughput` rewrites its kind's entries from a new run (`record_measurement`).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from .config import CellSpec, TaskConfig, eval_task_configs
from .config.model import SHAPES, Shape

THROUGHPUT_FILE = Path(__file__).with_name("throughput.json")
DEFAULT_DEVICE = "h200"

# Padded prompt and SFT-answer lengths (tokens) per task: the 95th percentile over the first 1,000 training
# problems with the chat template, SmolLM2-135M's tokenizer (batches pad to their longest row), 2026-12-02.
# mmlu_cs: the 0-shot plain-text prompt with its answer letter, 95th percentile over the 412 test questions
# (median 97, longest 474), same tokenizer and date; a few-shot prompt counts (1 + task.num_fewshot) times
# that. hellaswag: no copy here to measure; gsm8k's length stands in (the fallback below).
PROMPT_TOKENS = {"gsm8k": 148, "arithmetic": 58, "mmlu_cs": 225}
ANSWER_TOKENS = {"gsm8k": 190, "arithmetic": 35, "mmlu_cs": 2}
# Size of each task's test split when task.eval_limit is None (GSM8K's official test split; MMLU's four
# computer-science subjects; HellaSwag's validation split, which is what it evaluates).
TEST_SPLIT = {"gsm8k": 1319, "mmlu_cs": 412, "hellaswag": 10042}
# Forward rows per multiple-choice problem (tinyablate/evaluation/choice.py): MMLU's one-token letters share one
# row; HellaSwag's four endings are four rows.
CHOICE_ROWS = {"mmlu_cs": 1, "hellaswag": 4}


@dataclass
class DeviceThroughput:
    """The coefficients of one device kind, derived from its measurements (`derive`)."""

    kind: str
    train_flops_per_s: float  # effective FLOP/s of a training forward+backward (frozen base, bf16)
    decode_s_per_layer: float  # seconds per decoder layer per HF-generate decode step
    dp_efficiency: float  # training speed-up on N GPUs / N
    cell_overhead_s: float  # process start to the first step, without weights or evaluation
    svd_s_per_module: float  # cold frozen-basis computation per adapted module
    sources: dict = field(default_factory=dict)  # coefficient -> the measurement it comes from
    # seconds per decoder layer per decode step of tinyablate's graph engine (None: not measured on this
    # kind, and its cells are priced at HF generate's rate, an upper bound)
    engine_decode_s_per_layer: Optional[float] = None


@dataclass
class CellCost:
    """What the model says a cell costs."""

    gpu_hours: float
    wall_s: float
    parts: dict  # seconds: setup, rollout, train, eval (one rank's wall time)
    base_eval_s: float = 0.0  # the base evaluation (cached: paid once per model, task and eval settings)


@dataclass
class Estimate:
    """A cell's GPU-hours as the dry run prints it: from the model, calibrated, or measured."""

    gpu_hours: float
    source: str  # "model" | "calibrated" | "measured" | "cpu"
    n: int = 0  # completed cells behind a measured or calibrated figure
    factor: float = 1.0  # measured / model of those cells (calibrated)

    def label(self) -> str:
        if self.source == "measured":
            return f"measured, mean of {self.n} completed cell{'s' * (self.n != 1)}"
        if self.source == "calibrated":
            return f"model x {self.factor:.2f}, calibrated on {self.n} completed cell{'s' * (self.n != 1)}"
        return "CPU cell" if self.source == "cpu" else "model"


# -- the table ---------------------------------------------------------------------------------
class ThroughputTable:
    """The measurements per device kind (JSON: {"devices": {kind: {name: measurement}}})."""

    def __init__(self, data: dict, path: Optional[Path] = None) -> None:
        self.data, self.path = data, path

    def kinds(self) -> list:
        return sorted(self.data["devices"])

    def device(self, kind: str) -> DeviceThroughput:
        if kind not in self.data["devices"]:
            raise ValueError(
                f"no throughput measurements for device kind {kind!r} in {self.path}; known: {', '.join(self.kinds())}"
            )
        return derive(kind, self.data["devices"][kind])


def load_table(path: Optional[Path] = None) -> ThroughputTable:
    path = Path(path) if path is not None else THROUGHPUT_FILE
    return ThroughputTable(json.loads(path.read_text()), path)


def record_measurement(path: Path, kind: str, name: str, measurement: dict) -> None:
    """Replace measurement `name` ("decode", "train", "data_parallel", ...) of device `kind` in the table
    file (a benchmark's way to refresh the cost model; keep device, date, command and source in it)."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {"devices": {}}
    data["devices"].setdefault(kind, {})[name] = measurement
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def device_kind(device_name: str) -> str:
    """The table's key for a device name: "NVIDIA H200" -> "h200", "NVIDIA H100 80GB HBM3" -> "h100"."""
    words = device_name.lower().replace("nvidia", "").split()
    return words[0] if words else "unknown"


def derive(kind: str, m: dict) -> DeviceThroughput:
    """Coefficients from measurements: training FLOP/s from a timed training pass; decode seconds per layer
    from a timed rollout minus its prefill (at the training rate, forward only: 2 of 4 FLOPs per token)."""
    t = m["train"]
    train_flops = t["sequences"] * _train_flops_per_seq(_shape(t), t["tokens_per_sequence"]) / t["seconds"]
    per_layer = _decode_per_layer(m["decode"], train_flops)
    engine = _decode_per_layer(m["decode_engine"], train_flops) if "decode_engine" in m else None
    dp = m.get("data_parallel")
    efficiency = dp["train_s_1"] / (dp["gpus"] * dp["train_s_n"]) if dp else 1.0
    return DeviceThroughput(
        kind,
        train_flops,
        per_layer,
        efficiency,
        m["overhead"]["seconds"],
        m["svd"]["seconds_per_module"],
        {name: value.get("source", "") for name, value in m.items()},
        engine,
    )


def _decode_per_layer(d: dict, train_flops: float) -> float:
    """Seconds per layer per decode step of a timed rollout, its prefill (at the training rate, forward
    only) taken out."""
    shape = _shape(d)
    prefill = d["batch"] * _forward_flops_per_seq(shape, d["prompt_tokens"]) / train_flops
    return (d["seconds"] - prefill) / d["new_tokens"] / shape.layers


def engine_priced(dev: DeviceThroughput, engine: str) -> bool:
    """Whether a GPU cell's engine setting is priced at the graph engine's rate: "auto" and "graph" are the
    graph engine on CUDA, where this kind has its measurement; "hf" (and "eager", not measured) is HF's."""
    return engine in ("auto", "graph") and dev.engine_decode_s_per_layer is not None


def decode_rate(dev: DeviceThroughput, engine: str) -> float:
    """Seconds per layer per decode step of the generator an engine setting picks on a GPU cell."""
    return dev.engine_decode_s_per_layer if engine_priced(dev, engine) else dev.decode_s_per_layer


def _shape(measurement: dict) -> Shape:
    """The measured model's shape (a benchmark may run fewer layers than the model has)."""
    s = SHAPES[measurement["model"]]
    return Shape(**{**s.__dict__, "layers": measurement.get("layers", s.layers)})


# -- FLOPs -------------------------------------------------------------------------------------
def _matmul_params(s: Shape) -> int:
    """Weights a token multiplies by: every layer's projections and the LM head."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    per_layer = s.hidden * (2 * q + 2 * kv) + 3 * s.hidden * s.intermediate
    return s.layers * per_layer + s.vocab * s.hidden


def _forward_flops_per_seq(s: Shape, tokens: int) -> float:
    """One causal forward over a sequence: 2 FLOPs per weight per token + QKᵀ and AV over half the context."""
    attention = 4 * s.layers * s.heads * s.head_dim * tokens * tokens / 2
    return 2 * _matmul_params(s) * tokens + attention


def _train_flops_per_seq(s: Shape, tokens: int) -> float:
    """Forward + backward with frozen weights: the projections' backward is input gradients only (2N per
    token, as the forward); attention's backward is twice its forward."""
    attention = 4 * s.layers * s.heads * s.head_dim * tokens * tokens / 2
    return 4 * _matmul_params(s) * tokens + 3 * attention


# -- one cell ----------------------------------------------------------------------------------
def estimate_cell(spec: CellSpec, dev: DeviceThroughput) -> CellCost:
    """The modelled cost of one cell on device kind `dev` (a CPU cell, gpus=0, costs no GPU-hours)."""
    s, algo, ranks = SHAPES[spec.model.name], spec.algo, max(spec.gpus, 1)
    prompt = prompt_tokens(spec.task)
    if algo.name == "grpo":
        rollout, train = grpo_step(
            s,
            dev,
            algo.sequences_per_step,
            prompt,
            algo.max_completion_length,
            ranks,
            algo.num_iterations,
            algo.rollout_engine,
        )
    else:
        length = min(algo.max_length, prompt + ANSWER_TOKENS.get(spec.task.name, ANSWER_TOKENS["gsm8k"]))
        rollout, train = 0.0, training_seconds(s, dev, algo.sequences_per_step, length, ranks)
    steps = algo.max_steps if spec.train else 0
    tasks = eval_task_configs(spec).values()  # the training task and every other of eval.tasks
    parts = {
        "setup": dev.cell_overhead_s + _modules(spec, s) * dev.svd_s_per_module,
        "rollout": steps * rollout,
        "train": steps * train,
        "eval": sum(eval_seconds(spec, s, dev, task=t) for t in tasks),
    }
    wall = sum(parts.values())
    base = sum(eval_seconds(spec, s, dev, sampled=False, task=t) for t in tasks) if spec.eval.base else 0.0
    return CellCost(gpu_hours=spec.gpus * wall / 3600, wall_s=wall, parts=parts, base_eval_s=base)


def grpo_step(
    s: Shape,
    dev: DeviceThroughput,
    seqs: int,
    prompt: int,
    completion: int,
    ranks: int = 1,
    num_iterations: int = 1,
    engine: str = "hf",
) -> tuple:
    """(rollout, training) seconds of one GRPO step: every rank samples its share of `seqs` completions of
    `completion` tokens (prefill, then latency-bound decode steps of the `engine` setting's generator),
    then trains over all of them."""
    prefill = math.ceil(seqs / ranks) * _forward_flops_per_seq(s, prompt) / dev.train_flops_per_s
    rollout = prefill + completion * s.layers * decode_rate(dev, engine)
    train = training_seconds(s, dev, seqs, prompt + completion, ranks)
    if num_iterations == 1:
        return rollout, train
    # TRL samples once per `num_iterations` optimizer steps, and then runs a forward for the old log-probs
    return rollout / num_iterations, train * (1 + 0.5 / num_iterations)


def training_seconds(s: Shape, dev: DeviceThroughput, seqs: int, tokens: int, ranks: int = 1) -> float:
    """Forward + backward over `seqs` sequences of `tokens`, split over `ranks` data-parallel GPUs."""
    rate = dev.train_flops_per_s * (dev.dp_efficiency * ranks if ranks > 1 else 1)
    return seqs * _train_flops_per_seq(s, tokens) / rate


def prompt_tokens(task: TaskConfig) -> int:
    """A task's padded prompt length (PROMPT_TOKENS; gsm8k's where unmeasured; few-shot prompts scaled)."""
    return PROMPT_TOKENS.get(task.name, PROMPT_TOKENS["gsm8k"]) * (1 + task.num_fewshot)


def eval_seconds(
    spec: CellSpec, s: Shape, dev: DeviceThroughput, sampled: bool = True, task: Optional[TaskConfig] = None
) -> float:
    """Greedy pass@1 over `task`'s test problems (default: the training task's; + pass@k samples), split
    over the cell's ranks; a multiple-choice task is one forward per row (no decoding)."""
    task = task or spec.task
    problems = task.eval_limit or (task.eval_size if task.name == "arithmetic" else TEST_SPLIT.get(task.name, 0))
    ranks = max(spec.gpus, 1)
    if task.is_multiple_choice:
        rows = math.ceil(problems * CHOICE_ROWS[task.name] / ranks)
        return rows * _forward_flops_per_seq(s, prompt_tokens(task)) / dev.train_flops_per_s
    rows = problems * (1 + (spec.eval.pass_k if sampled else 0))
    rate = decode_rate(dev, spec.eval.engine)
    batch = spec.eval.engine_batch_size if engine_priced(dev, spec.eval.engine) else spec.eval.batch_size
    batches = math.ceil(math.ceil(rows / max(spec.gpus, 1)) / batch)
    prefill = (
        math.ceil(rows / max(spec.gpus, 1)) * _forward_flops_per_seq(s, prompt_tokens(task)) / dev.train_flops_per_s
    )
    return prefill + batches * spec.eval.max_new_tokens * s.layers * rate


def _modules(spec: CellSpec, s: Shape) -> int:
    """Adapted modules whose frozen basis is computed (TinyLoRA, LoRA-XS)."""
    a = spec.adapter
    if a.kind not in ("tinylora", "lora_xs"):
        return 0
    layers = len(a.layers) if a.layers else s.layers
    return layers * len(a.target_modules)


# -- packing -----------------------------------------------------------------------------------
# GPU throughput gained by running N one-GPU cells at once on one GPU (hydra.launcher.cells_per_gpu), as cells per
# hour against one at a time, measured with warm bundles on the embedded model (benchmarks/pack_bench.py;
# benchmarks/RESULTS.md, "session 7": 184, 941 and ~900 cells an hour at N = 1, 8, 16 on 16 CPU cores: the CPU, not
# the GPU, bounds it). Linear between measured N, flat beyond the last; other device kinds use the h200's.
PACKING_SPEEDUP = {"h200": ((1, 1.0), (8, 5.1), (16, 4.9))}


def packing_speedup(n: int, kind: str = DEFAULT_DEVICE) -> float:
    """How many times more cells a GPU finishes per hour running `n` at once (PACKING_SPEEDUP)."""
    points = PACKING_SPEEDUP.get(kind, PACKING_SPEEDUP[DEFAULT_DEVICE])
    if n <= points[0][0]:
        return points[0][1]
    for (n0, s0), (n1, s1) in zip(points, points[1:]):
        if n <= n1:
            return s0 + (s1 - s0) * (n - n0) / (n1 - n0)
    return points[-1][1]


# -- memory ------------------------------------------------------------------------------------
CUDA_CONTEXT_BYTES = 600 * 2**20  # a process's CUDA context and kernels (outside torch's allocator), assumed
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}  # auto: bfloat16 on a GPU


def cell_memory_bytes(spec: CellSpec) -> int:
    """GPU memory one rank of a cell needs, modelled: the frozen weights twice (the model's and the generation
    engine's packed and merged copies), the KV cache for the larger of a rollout batch and an evaluation batch,
    a training micro-batch's activations (a few hidden-size tensors per layer and token) and its logits
    (model dtype + float32 log-softmax and gradient), and the CUDA context. benchmarks/pack_bench.py measures it
    against each cell's timing.gpu_peak_gib (benchmarks/RESULTS.md); the launcher's cells_per_gpu=auto packs by it
    with a margin."""
    s, algo, ranks = SHAPES[spec.model.name], spec.algo, max(spec.gpus, 1)
    width = DTYPE_BYTES.get(spec.model.dtype, 2)
    weights = 2 * (_matmul_params(s) + s.vocab * s.hidden) * width
    per_token_kv = 2 * s.layers * s.kv_heads * s.head_dim * width
    prompt = prompt_tokens(spec.task)
    problems = spec.task.eval_limit or (
        spec.task.eval_size if spec.task.name == "arithmetic" else TEST_SPLIT.get(spec.task.name, 0)
    )
    eval_tokens = min(spec.eval.engine_batch_size, max(problems, 1)) * (prompt + spec.eval.max_new_tokens)
    if algo.name == "grpo":
        seq = prompt + algo.max_completion_length
        rollout_tokens = math.ceil(algo.sequences_per_step / ranks) * seq
    else:
        seq, rollout_tokens = algo.max_length, 0
    micro = algo.micro_batch_size * seq if spec.train else 0
    activations = micro * s.layers * 8 * s.hidden * width + micro * s.vocab * (width + 8)
    return int(weights + per_token_kv * max(eval_tokens, rollout_tokens) + activations + CUDA_CONTEXT_BYTES)


def cells_per_gpu(specs: list, gpu_bytes: int, margin: float = 1.5, usable: float = 0.9) -> tuple:
    """(how many of these cells fit on one GPU of `gpu_bytes` at once, the largest cell's modelled bytes): the
    usable share of the GPU over the largest cell's model x margin."""
    need = max(cell_memory_bytes(spec) for spec in specs)
    return max(int(usable * gpu_bytes // (margin * need)), 0), need


# -- calibration -------------------------------------------------------------------------------
def cost_kind(spec: CellSpec) -> tuple:
    """Cells of one kind cost the same: everything the model reads (the adapter's size does not count)."""
    a, e, t = spec.algo, spec.eval, spec.task
    return (
        spec.model.name,
        spec.model.quantization,
        spec.gpus,
        spec.train,
        t.name,
        t.eval_limit,
        t.eval_size,
        t.num_fewshot,
        a.name,
        a.max_steps,
        a.prompts_per_step,
        a.num_generations,
        a.max_completion_length,
        a.max_length,
        a.num_iterations,
        a.rollout_engine,
        e.batch_size,
        e.max_new_tokens,
        e.pass_k,
        e.base,
        e.engine,
        e.engine_batch_size,
        tuple(e.tasks),
        json.dumps(e.task_settings, sort_keys=True, default=str),
    )


def calibrate(specs: list, completed: Iterable, dev: DeviceThroughput) -> list:
    """An Estimate per spec. `completed`: (spec, measured GPU-hours) of completed cells. A cell of a kind
    that has completed cells takes their mean (measured); otherwise, when cells of the same model, algorithm
    and GPU count completed, the model's figure times the median of their measured / modelled ratios
    (calibrated); otherwise the model's figure."""
    measured: dict = {}
    ratios: dict = {}
    for spec, hours in completed:
        if spec.gpus == 0 or hours is None:
            continue
        measured.setdefault(cost_kind(spec), []).append(hours)
        modelled = estimate_cell(spec, dev).gpu_hours
        if modelled > 0:
            ratios.setdefault(_family(spec), []).append(hours / modelled)
    out = []
    for spec in specs:
        if spec.gpus == 0:
            out.append(Estimate(0.0, "cpu"))
        elif cost_kind(spec) in measured:
            hours = measured[cost_kind(spec)]
            out.append(Estimate(sum(hours) / len(hours), "measured", len(hours)))
        elif _family(spec) in ratios:
            r = ratios[_family(spec)]
            factor = statistics.median(r)
            out.append(Estimate(estimate_cell(spec, dev).gpu_hours * factor, "calibrated", len(r), factor))
        else:
            out.append(Estimate(estimate_cell(spec, dev).gpu_hours, "model"))
    return out


def _family(spec: CellSpec) -> tuple:
    return (spec.model.name, spec.algo.name, spec.gpus)
