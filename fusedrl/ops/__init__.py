"""The op layer: every fused op fusedrl runs, each in its own folder with its whole story.

``<op>/reference.py`` is the readable fp32 truth, ``<op>/compiled.py`` the ``torch.compile`` formulation,
``<op>/triton.py`` the Triton kernels, and ``<op>/__init__.py`` the public function with its input checks and custom
op. ``dispatch`` selects the backend per op (``use_kernels``, config, ``FUSEDRL_KERNELS``, default) and falls back at
run time. Ops hold tensor math only: no ``nn.Module``, no config objects; they import nothing from
``fusedrl.runtime``, ``fusedrl.trainers`` or ``fusedrl.cli``.
"""
