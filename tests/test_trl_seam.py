"""The seam to TRL (tinyablate/train/trl_seam.py): every TRL / transformers method tinyablate overrides has the
signature recorded here in the installed version, every trainer attribute the seam reads exists, and nothing
outside the seam subclasses their trainers or reads their private attributes. TRL is pinned only `trl>=1.0,<2`:
an upgrade that moves one of these fails here instead of in a sweep."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
from transformers import Trainer

from tinyablate.train import trl_seam
from tinyablate.train.trl_seam import TinyablateGRPOTrainer, TinyablateSFTTrainer, TrainerSettings

REPO = Path(__file__).resolve().parents[1]
SEAM = REPO / "tinyablate" / "train" / "trl_seam.py"

# Each overridden method: the signature (annotations dropped) of every definition it overrides, by class.
GRPO_LOGPS = (
    "(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, "
    "compute_aux_loss=False, pixel_values=None, image_grid_thw=None, num_images=None, pixel_attention_mask=None, "
    "spatial_shapes=None, num_tiles=None, image_sizes=None, token_type_ids=None, mm_token_type_ids=None, "
    "image_position_ids=None)"
)
CHECKPOINTS = {
    "_load_from_checkpoint": {"Trainer": "(self, resume_from_checkpoint, model=None)"},
    "_save": {"Trainer": "(self, output_dir=None, state_dict=None)"},
}
EXPECTED = {
    TinyablateSFTTrainer: {
        **CHECKPOINTS,
        "training_step": {
            "SFTTrainer": "(self, *args, **kwargs)",
            "Trainer": "(self, model, inputs, num_items_in_batch=None)",
        },
    },
    TinyablateGRPOTrainer: {
        **CHECKPOINTS,
        "_generate_and_score_completions": {"GRPOTrainer": "(self, inputs)"},
        "_generate_single_turn": {
            "GRPOTrainer": "(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False)"
        },
        "_get_per_token_logps_and_entropies": {"GRPOTrainer": GRPO_LOGPS},
        "compute_loss": {
            "GRPOTrainer": "(self, model, inputs, return_outputs=False, num_items_in_batch=None)",
            "Trainer": "(self, model, inputs, return_outputs=False, num_items_in_batch=None)",
        },
        "log": {"GRPOTrainer": "(self, logs, start_time=None)", "Trainer": "(self, logs, start_time=None)"},
        "training_step": {
            "GRPOTrainer": "(self, model, inputs, num_items_in_batch)",
            "Trainer": "(self, model, inputs, num_items_in_batch=None)",
        },
    },
}

# The GRPO trainer attributes the seam reads (set by TRL or transformers, not by tinyablate).
GRPO_ATTRIBUTES = {
    "_metrics",
    "_tokenizer",
    "accelerator",
    "args",
    "eos_token_ids",
    "generation_config",
    "generation_kwargs",
    "max_completion_length",
    "min_p",
    "model",
    "model_wrapped",
    "repetition_penalty",
    "state",
    "temperature",
    "top_k",
    "top_p",
}
TRL_PRIVATE = {name for name in GRPO_ATTRIBUTES if name.startswith("_")}


def _shape(function) -> str:
    sig = inspect.signature(function)
    empty = inspect.Parameter.empty
    return str(
        sig.replace(parameters=[p.replace(annotation=empty) for p in sig.parameters.values()], return_annotation=empty)
    )


def _overridden(cls) -> dict:
    """{method: {base class: signature}} for each method a tinyablate class in cls's MRO defines over a base."""
    ours = [k for k in cls.__mro__ if k.__module__.startswith("tinyablate")]
    theirs = [k for k in cls.__mro__ if not k.__module__.startswith("tinyablate") and k is not object]
    names = {n for k in ours for n in vars(k) if not n.startswith("__") and any(n in vars(t) for t in theirs)}
    return {n: {t.__name__: _shape(vars(t)[n]) for t in theirs if n in vars(t)} for n in names}


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_each_overridden_method_has_its_recorded_signature(cls):
    assert _overridden(cls) == EXPECTED[cls]


def _library_modules():
    for path in sorted((REPO / "tinyablate").rglob("*.py")):
        yield path, ast.parse(path.read_text())


def test_only_the_seam_subclasses_trainers_or_reads_their_private_attributes():
    offenders = []
    for path, tree in _library_modules():
        if path == SEAM:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in TRL_PRIVATE:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} reads .{node.attr}")
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b).rpartition(".")[2] for b in node.bases}
                if bases & {"Trainer", "GRPOTrainer", "SFTTrainer"}:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} subclasses {sorted(bases)}")
    assert not offenders, offenders


def _seam_reads() -> set:
    """The `self.X` the seam reads that its own classes do not define (class bodies, __init__)."""
    tree = ast.parse(SEAM.read_text())
    own, read = set(), set()
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for item in cls.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                own.add(item.name)
                if item.name == "__init__":
                    own |= {
                        n.attr for n in ast.walk(item) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
                    }
            elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                own |= {t.id for t in targets if isinstance(t, ast.Name)}
        for node in ast.walk(cls):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                read.add(node.attr)
    return read - own


def test_the_pinned_attributes_are_the_ones_the_seam_reads():
    assert _seam_reads() == GRPO_ATTRIBUTES


@pytest.fixture(scope="module")
def grpo_trainer(tmp_path_factory):
    from test_cell import tiny_spec
    from tinyablate.models import load_model_and_tokenizer
    from tinyablate.tasks import load_task
    from tinyablate.train import build_trainer

    tmp = tmp_path_factory.mktemp("seam")
    spec = tiny_spec(tmp, rollout_sampler="keyed", rollout_engine="hf")
    model, tokenizer, _ = load_model_and_tokenizer(spec.model)
    return build_trainer(model, tokenizer, load_task(spec.task), spec, tmp / "out", model.device)


def test_the_trainer_holds_the_attributes_the_seam_reads(grpo_trainer):
    missing = sorted(name for name in GRPO_ATTRIBUTES if not hasattr(grpo_trainer, name))
    assert not missing, f"TRL no longer sets {missing} on GRPOTrainer: update train/trl_seam.py"
    assert "train" in grpo_trainer._metrics and grpo_trainer._tokenizer.pad_token_id is not None


def test_settings_are_given_at_construction_and_fixed(grpo_trainer):
    settings = grpo_trainer.settings
    assert isinstance(settings, TrainerSettings)
    assert settings.keyed_seed == 0 and settings.rollout_engine == "hf" and settings.rollout_is_cap is None
    assert grpo_trainer.guard is settings.guard is not None
    assert grpo_trainer.collapse_watch is settings.collapse_watch is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.keyed_seed = 1
    with pytest.raises(AttributeError):
        grpo_trainer.guard = None


def test_the_seam_trainers_are_trainers():
    assert issubclass(TinyablateGRPOTrainer, Trainer) and issubclass(TinyablateSFTTrainer, Trainer)
    assert trl_seam.TinyablateGRPOTrainer.__module__ == "tinyablate.train.trl_seam"


def test_keyed_sampling_knows_nothing_of_transformers_or_trl():
    """tinyablate/sampling.py is the ground floor of the engine and training: torch only (the seam switches its
    sampler into TRL's generation)."""
    tree = ast.parse((REPO / "tinyablate" / "sampling.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {
        (n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level
    }
    assert not imported & {"transformers", "trl"}, imported
