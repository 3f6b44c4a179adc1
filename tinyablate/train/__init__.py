"""Training: GRPO and SFT through TRL on the adapter already applied to the model."""

from .common import first_step_timer, ignore_frozen_in_ddp, last_complete_checkpoint, rank_sync_check


def build_trainer(model, tokenizer, task, spec, output_dir, device, callbacks=(), world_size: int = 1):
    """The TRL trainer for `spec.algo.name` (grpo or sft); `world_size` ranks share each step's batch."""
    if world_size > 1:
        ignore_frozen_in_ddp(model)
        callbacks = [*callbacks, rank_sync_check(model)]
    if spec.algo.name == "grpo":
        from .grpo import build_grpo_trainer
        return build_grpo_trainer(model, tokenizer, task, spec, output_dir, device, callbacks, world_size)
    from .sft import build_sft_trainer
    return build_sft_trainer(model, tokenizer, task, spec, output_dir, device, callbacks, world_size)


__all__ = ["build_trainer", "first_step_timer", "last_complete_checkpoint"]
