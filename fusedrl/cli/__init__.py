"""The ``fusedrl`` command line: the trainers, ``demo`` (with its presets), ``bench`` and the ``aot`` report."""

from fusedrl.cli.main import main

__all__ = ["main"]
