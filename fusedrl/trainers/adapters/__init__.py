"""Several PEFT adapters on one base model: the trained adapter(s) and the reference adapter chosen by name
(``named.py``: ``model_adapter_name`` / ``ref_adapter_name``, :func:`use_adapter`, the checkpoint layout)."""

from .named import check_adapter_names, use_adapter

__all__ = ["check_adapter_names", "use_adapter"]
