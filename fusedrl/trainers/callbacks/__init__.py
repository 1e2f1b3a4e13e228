"""``transformers.TrainerCallback``s usable with any ``transformers.Trainer`` (fusedrl's trainers subclass it).

- :class:`RichProgressCallback`: progress bars and a metrics table on a terminal, plain log lines elsewhere.
- :class:`SyncRefModelCallback`: TR-DPO reference-model syncing (plain models, PEFT adapters, ZeRO-3, FSDP2 hook).
- :class:`WinRateCallback`: judged win rate of the policy against reference completions at each evaluation.
- :class:`LogCompletionsCallback`: tables of generated completions, to wandb or the console.
"""

from .completions import LogCompletionsCallback, WinRate, WinRateCallback, judge_against_reference
from .progress import RichProgressCallback, use_rich_progress
from .sync_ref import SyncRefModelCallback, default_gather, mix_into_

__all__ = [
    "LogCompletionsCallback",
    "RichProgressCallback",
    "SyncRefModelCallback",
    "WinRate",
    "WinRateCallback",
    "default_gather",
    "judge_against_reference",
    "mix_into_",
    "use_rich_progress",
]
