"""Public fused ops: validation, backend dispatch, torch.library registration and autograd."""
