"""Tensor math only: pure-torch references, chunkable torch formulations and Triton kernels.

No nn.Module, no config objects, no environment reads: selection, compilation and autograd live in
``fusedrl.engine``.
"""
