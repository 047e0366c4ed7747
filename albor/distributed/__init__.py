"""The distributed layer: the only code that imports torch.distributed or deepspeed."""
