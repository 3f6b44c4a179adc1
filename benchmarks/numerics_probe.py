"""Where a cell's training first goes non-finite, and what its numbers look like on the way there.

    python benchmarks/numerics_probe.py --out /tmp/probe/bf16 -- adapter.tie=all algo=grpo_cpu adapter.u=256 \
        algo.max_steps=30 gpus=1 logger=disabled
    python benchmarks/numerics_probe.py --out /tmp/probe/fp32head --fp32-lm-head -- ...   # TRL's fp32 LM head
    python benchmarks/numerics_probe.py --out /tmp/probe/op --anomaly-from 20 -- ...      # which backward op NaNs

Builds the cell as run_cell does (build.build: the same model, adapter, task and device), trains it through the
same `train.run.train` with a probe callback, and evaluates the training task greedily. Nothing is written to the
sweep's folders: the checkpoints go under --out. Writes <out>/probe.jsonl, one record per optimizer step:

- the trainer's loss and gradient norm (before clipping) and GRPO's reward / entropy as logged;
- max |v| over the trainable tensors after the step;
- per decoder layer (and the final norm) the largest |activation| of the step's forwards and the largest
  |gradient| reaching its output in the backwards, and which of them held a non-finite value;
- the smallest completion-token log-probability and the largest entropy under the training forward (GRPO);
- with the engine's rollouts, |log p_rollout - log p_train| over completion tokens (mean, max), as the cell logs.

and <out>/summary.json (base and final accuracy, the first step with a non-finite value and where). One line
per step is printed. `--fp32-lm-head` sets TRL's GRPOConfig.cast_lm_head_to_fp32 (an experiment, not a setting).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for probe.jsonl, summary.json and checkpoints")
    p.add_argument("--fp32-lm-head", action="store_true", help="TRL's cast_lm_head_to_fp32=True (GRPO)")
    p.add_argument("--no-eval", action="store_true", help="skip the base and final evaluations")
    p.add_argument(
        "--spikes",
        type=float,
        default=0.0,
        help="GRPO: describe (and save under <out>/spikes) every step whose rollout-train mismatch "
        "exceeds this many nats, with a no-grad eval-mode forward of the same batch as a third opinion",
    )
    p.add_argument(
        "--engine",
        default="",
        help="engine settings for the rollouts: use_graphs and EngineOptions fields, e.g. 'use_graphs=0,"
        "share_prompts=0,attention=sdpa,compile_glue=0' (an experiment, not a setting)",
    )
    p.add_argument(
        "--anomaly-from",
        type=int,
        default=0,
        help="turn on torch's anomaly detection from this optimizer step on: the first backward op "
        "that returns a NaN raises, naming itself, with the forward line that made it (slow)",
    )
    p.add_argument("overrides", nargs="*", help="the cell's Hydra overrides, as for launch.py")
    args = p.parse_args(argv)

    from tinyablate.build import build
    from tinyablate.console import quiet_known_warnings
    from tinyablate.evaluation import evaluate_task
    from tinyablate.evaluation.plan import base_accuracy
    from tinyablate.train.run import train

    quiet_known_warnings()
    spec = compose(args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.out / "checkpoints", ignore_errors=True)  # a fresh run, never a resume
    if args.fp32_lm_head:
        _fp32_lm_head()
    if args.engine:
        _engine_options(args.engine)
    if args.spikes:
        _describe_spikes(args.spikes, args.out / "spikes")
    built = build(spec)
    print(
        f"probe: {spec.model.name} {next(built.model.parameters()).dtype} on {built.device}, "
        f"{built.adapter.trainable_params} trainable, overrides {' '.join(args.overrides)}",
        flush=True,
    )
    base = None if args.no_eval else base_accuracy(spec, built).accuracy
    probe = Probe(built.model, args.out / "probe.jsonl")
    callbacks = [probe] + ([AnomalyFrom(args.anomaly_from)] if args.anomaly_from else [])
    t0 = time.time()
    error = None
    try:
        steps = train(spec, built, args.out, callbacks).steps
    except Exception as err:  # the guard (or anything else) stopped training: record it and the step it stopped in
        error, steps = f"{type(err).__name__}: {err}", probe.step
        probe.record_stopped_step(error)
    train_s = time.time() - t0
    final = None
    if not args.no_eval and error is None:
        final = evaluate_task(built.model, built.tokenizer, built.task, spec.eval, desc="eval probe")[0]["accuracy"]
    summary = {
        "overrides": args.overrides,
        "fp32_lm_head": args.fp32_lm_head,
        "device": str(built.device),
        "dtype": str(next(built.model.parameters()).dtype),
        "steps": steps,
        "train_s": train_s,
        "base_accuracy": base,
        "accuracy": final,
        "error": error,
        "first_nonfinite": probe.first_nonfinite,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("probe summary: " + json.dumps(summary), flush=True)
    return 0


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hydra_plugins.tinyablate.conf import register, spec_from_hydra
    from tinyablate.config import validate_spec

    register()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    return validate_spec(spec_from_hydra(cfg))


def _fp32_lm_head() -> None:
    import functools

    from tinyablate.train import grpo

    grpo.GRPOConfig = functools.partial(grpo.GRPOConfig, cast_lm_head_to_fp32=True)


def _engine_options(text: str) -> None:
    """Rollout engines built with these settings: `use_graphs` (GenerationEngine's argument) or any EngineOptions
    field (values: 0/1, or a string)."""
    import dataclasses
    import functools

    from tinyablate.engine import EngineOptions, GenerationEngine

    fields = {f.name for f in dataclasses.fields(EngineOptions)}
    arguments, options = {}, {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        if key != "use_graphs" and key not in fields:
            raise SystemExit(f"--engine {key}=...: use_graphs or one of EngineOptions' {sorted(fields)}")
        (options if key in fields else arguments)[key] = {"0": False, "1": True}.get(value, value)
    original = GenerationEngine.__init__

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        kwargs.update(arguments)
        kwargs["options"] = dataclasses.replace(kwargs.get("options") or EngineOptions(), **options)
        original(self, *args, **kwargs)

    GenerationEngine.__init__ = init


def _describe_spikes(threshold: float, folder: Path) -> None:
    """After each GRPO loss: if max |log p_rollout - log p_train| > threshold, print where (row, token, both
    log-probs, the prompt's group), a no-grad eval-mode forward's log p of the same tokens (the model's own
    HF forward: positions from 0, as TRL's; and from the attention mask, as the engine's), and save the batch."""
    from tinyablate.train.trl_seam import TinyablateGRPOTrainer

    original = TinyablateGRPOTrainer.compute_loss
    folder.mkdir(parents=True, exist_ok=True)

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        sampling, train = inputs.get("sampling_per_token_logps"), self._train_logps
        if sampling is None or train is None:
            return loss
        mask = inputs["completion_mask"].bool()
        diff = (train - sampling).abs() * mask
        if diff.max().item() <= threshold:
            return loss
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        n = inputs["completion_ids"].shape[1]
        was = model.training
        model.eval()
        with torch.no_grad():
            opinions = {}
            for name, pos in (("eval_fwd", None), ("eval_fwd_maskpos", (attn.cumsum(-1) - 1).clamp(min=0))):
                logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -n - 1 : -1].float()
                scores = (logits / self.temperature).log_softmax(-1)
                opinions[name] = scores.gather(-1, inputs["completion_ids"][..., None])[..., 0]
        model.train(was)
        step = self.state.global_step + 1
        tok = self.processing_class
        prompts = [tuple(r[m.bool()].tolist()) for r, m in zip(inputs["prompt_ids"], inputs["prompt_mask"])]
        groups = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        print(
            f"SPIKE step {step}: max {diff.max().item():.1f} nats; prompt lengths "
            f"{sorted({len(p) for p in prompts})}; groups {[groups[p] for p in prompts]}",
            flush=True,
        )
        for r in range(ids.shape[0]):
            row = diff[r]
            if row.max() <= threshold:
                continue
            bad = (row > threshold).nonzero()[:, 0].tolist()
            i = bad[0]
            length = int(mask[r].sum())
            print(
                f"  row {r} (group {groups[prompts[r]]}): {len(bad)} of {length} tokens above, first at {i} "
                f"({tok.decode(inputs['completion_ids'][r, i : i + 1])!r}): rollout {sampling[r, i].item():.2f} "
                f"train {train[r, i].item():.2f} eval_fwd {opinions['eval_fwd'][r, i].item():.2f} "
                f"eval_fwd_maskpos {opinions['eval_fwd_maskpos'][r, i].item():.2f}; "
                f"text {tok.decode(inputs['completion_ids'][r, :length])!r}",
                flush=True,
            )
        torch.save(
            {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in inputs.items()}
            | {
                "train_logps": train.cpu(),
                **{k: v.cpu() for k, v in opinions.items()},
                "v": [p.detach().cpu() for p in model.parameters() if p.requires_grad],
            },
            folder / f"step{step}.pt",
        )
        return loss

    TinyablateGRPOTrainer.compute_loss = compute_loss


class AnomalyFrom(TrainerCallback):
    """torch.autograd's anomaly detection (NaN check on every backward op) from optimizer step `step` on."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 >= self.step and not torch.is_anomaly_enabled():
            print(f"probe: anomaly detection on from step {state.global_step + 1}", flush=True)
            torch.autograd.set_detect_anomaly(True, check_nan=True)


class Probe(TrainerCallback):
    """Forward/backward hooks on every decoder layer and the final norm; one JSON record per optimizer step."""

    def __init__(self, model, path: Path) -> None:
        self.model, self.path = model, path
        self.step, self.first_nonfinite = 0, None
        self._file = open(path, "w")
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.modules = {f"layer{i}": layer for i, layer in enumerate(lm.model.layers)}
        self.modules["norm"] = lm.model.norm
        self._stats = {}
        self._logps = []
        self._pending = None
        for name, module in self.modules.items():
            module.register_forward_hook(self._forward_hook(name))
        _wrap_logps(self._logps)

    def _forward_hook(self, name):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            if not torch.is_tensor(out) or not torch.is_grad_enabled():
                return  # rollouts and evaluation: only the training forward is probed
            self._record(name, "fwd", out.detach())
            if out.requires_grad:
                out.register_hook(lambda g: self._record(name, "bwd", g.detach()))

        return hook

    def _record(self, name, phase, x):
        amax = x.abs().float().nan_to_num(nan=float("inf")).amax()
        bad = (~torch.isfinite(x)).any()
        key = (name, phase)
        if key in self._stats:
            old_amax, old_bad = self._stats[key]
            self._stats[key] = (torch.maximum(old_amax, amax), old_bad | bad)
        else:
            self._stats[key] = (amax, bad)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """The trainer logs a step after on_step_end: its record is written here, with the logged values."""
        if logs and "train_runtime" not in logs and self._pending is not None:
            self._write(self._pending, logs)
            self._pending = None

    def on_train_end(self, args, state, control, **kwargs):
        if self._pending is not None:
            self._write(self._pending, {})
            self._pending = None

    def on_step_end(self, args, state, control, **kwargs):
        if self._pending is not None:
            self._write(self._pending, {})
        self.step = state.global_step
        record = {"step": state.global_step}
        vmax = max(
            (
                p.detach().abs().float().nan_to_num(nan=float("inf")).max().item()
                for p in self.model.parameters()
                if p.requires_grad
            ),
            default=0.0,
        )
        record["v_absmax"] = vmax
        fwd = {n: self._stats[(n, "fwd")][0].item() for n in self.modules if (n, "fwd") in self._stats}
        bwd = {n: self._stats[(n, "bwd")][0].item() for n in self.modules if (n, "bwd") in self._stats}
        bad = [f"{n}:{ph}" for (n, ph), (_, b) in self._stats.items() if b.item()]
        record.update(
            act_absmax=max(fwd.values(), default=None),
            grad_absmax=max(bwd.values(), default=None),
            act_by_module=fwd,
            grad_by_module=bwd,
            nonfinite=bad,
        )
        if self._logps:
            record["train_logp_min"] = min(x[0] for x in self._logps)
            record["train_entropy_max"] = max(x[1] for x in self._logps)
        self._pending = record
        self._stats.clear()
        self._logps.clear()

    def record_stopped_step(self, error: str) -> None:
        """The step training stopped in (the guard raises before on_step_end): what its hooks saw."""
        if self._pending is not None:
            self._write(self._pending, {})
        bad = [f"{n}:{ph}" for (n, ph), (_, b) in self._stats.items() if b.item()]
        record = {
            "step": self.step + 1,
            "stopped": error,
            "nonfinite": bad,
            "v_absmax": None,
            "act_by_module": {n: a.item() for (n, ph), (a, _) in self._stats.items() if ph == "fwd"},
            "grad_by_module": {n: a.item() for (n, ph), (a, _) in self._stats.items() if ph == "bwd"},
        }
        if self._logps:
            record["train_logp_min"] = min(x[0] for x in self._logps)
        if self.first_nonfinite is None:
            self.first_nonfinite = {"step": self.step + 1, "where": bad, "error": error}
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        print("probe stopped " + json.dumps({k: record[k] for k in ("step", "nonfinite")}), flush=True)

    def _write(self, record: dict, logs: dict) -> None:
        for key in (
            "loss",
            "grad_norm",
            "reward",
            "entropy",
            "frac_reward_zero_std",
            "completions/mean_length",
            "train/rollout_logp_diff_mean",
            "train/rollout_logp_diff_max",
            "rollout_logp_diff_mean",
            "rollout_logp_diff_max",
            "nonfinite_skipped_steps",
        ):
            if key in logs:
                record[key] = logs[key]
        bad, vmax = record["nonfinite"], record["v_absmax"]
        vmax = vmax if vmax is not None else 0.0
        nonfinite_now = (
            bad
            or not math.isfinite(vmax)
            or any(isinstance(record.get(k), float) and not math.isfinite(record[k]) for k in ("loss", "grad_norm"))
        )
        if nonfinite_now and self.first_nonfinite is None:
            self.first_nonfinite = {
                "step": record["step"],
                "where": bad,
                "loss": record.get("loss"),
                "grad_norm": record.get("grad_norm"),
                "v_absmax": vmax,
            }
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        short = {
            k: record.get(k)
            for k in (
                "step",
                "loss",
                "grad_norm",
                "reward",
                "v_absmax",
                "act_absmax",
                "grad_absmax",
                "train_logp_min",
                "rollout_logp_diff_max",
            )
        }
        print("probe " + json.dumps(short) + (f" NONFINITE {bad}" if bad else ""), flush=True)


def _wrap_logps(sink: list) -> None:
    """Record (min log p, max entropy) of completion tokens from GRPO's training forwards."""
    from tinyablate.train.trl_seam import TinyablateGRPOTrainer

    original = TinyablateGRPOTrainer._get_per_token_logps_and_entropies
    if getattr(original, "_probed", False):
        return

    def wrapped(self, *args, **kwargs):
        logps, entropies, aux = original(self, *args, **kwargs)
        if torch.is_grad_enabled():
            valid = logps.detach() != 0  # completion tokens only (padding positions are 0)
            lp = logps.detach()[valid]
            ent = entropies.detach()[valid] if entropies is not None else None
            sink.append(
                (lp.min().item() if lp.numel() else 0.0, ent.max().item() if ent is not None and ent.numel() else 0.0)
            )
        return logps, entropies, aux

    wrapped._probed = True
    TinyablateGRPOTrainer._get_per_token_logps_and_entropies = wrapped


if __name__ == "__main__":
    raise SystemExit(main())
