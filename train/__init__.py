"""The training loop: losses, optimizer and schedule, checkpoints, metrics and W&B."""
