"""TRL-compatible data utilities: formats and conversions, packing, and fail-fast dataset validation.

Names and semantics follow ``trl.data_utils`` (1.16) so a TRL recipe's preprocessing ports unchanged; fusedrl does
not import trl. ``formats`` converts between TRL's dataset layouts, ``packing`` packs and truncates tokenized
datasets, ``validation`` checks a dataset before training.
"""

from fusedrl.trainers.data.formats import (
    apply_chat_template,
    extract_prompt,
    is_conversational,
    maybe_apply_chat_template,
    maybe_extract_prompt,
    maybe_unpair_preference_dataset,
    unpair_preference_dataset,
)
from fusedrl.trainers.data.packing import pack_dataset, position_ids_from_seq_lengths, truncate_dataset
from fusedrl.trainers.data.validation import (
    DatasetFormatError,
    check_prompt_dataset,
    validate_preference_dataset,
    validate_prompt_dataset,
)

__all__ = [
    "DatasetFormatError",
    "apply_chat_template",
    "check_prompt_dataset",
    "extract_prompt",
    "is_conversational",
    "maybe_apply_chat_template",
    "maybe_extract_prompt",
    "maybe_unpair_preference_dataset",
    "pack_dataset",
    "position_ids_from_seq_lengths",
    "truncate_dataset",
    "unpair_preference_dataset",
    "validate_preference_dataset",
    "validate_prompt_dataset",
]
