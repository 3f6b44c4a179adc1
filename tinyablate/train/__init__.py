"""Training: GRPO and SFT through TRL on the adapter already applied to the model."""

from .common import first_step_timer, last_complete_checkpoint


def build_trainer(model, tokenizer, task, spec, output_dir, device, callbacks=()):
    """The TRL trainer for `spec.algo.name` (grpo or sft)."""
    if spec.algo.name == "grpo":
        from .grpo import build_grpo_trainer
        return build_grpo_trainer(model, tokenizer, task, spec, output_dir, device, callbacks)
    from .sft import build_sft_trainer
    return build_sft_trainer(model, tokenizer, task, spec, output_dir, device, callbacks)


__all__ = ["build_trainer", "first_step_timer", "last_complete_checkpoint"]
