"""Generalised advantage estimation (GAE) over ``[B, T]`` rollouts: a readable loop (``reference``), a loop-free
blocked formulation for ``torch.compile`` (``scan``) and a Triton kernel (``triton_gae``, imported on first use)."""
