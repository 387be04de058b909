"""Parallel layouts (expert, tensor, data parallel; ZeRO through DeepSpeed) wrapping model/ from outside."""
