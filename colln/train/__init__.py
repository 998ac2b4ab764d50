"""Accuracy recovery for pruned models: fine-tuning with distillation, one process or DDP under torchrun."""
