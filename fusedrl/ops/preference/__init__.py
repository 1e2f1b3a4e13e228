"""The ``preference`` op: TRL 1.16's preference losses (DPO family, CPO family, ORPO, KTO) on sequence log-probs or on
hidden states + LM head, and the sequence helpers that make their inputs.

Legend: B pairs, N unpaired examples, T next-token positions, H hidden, V vocabulary; ``2B`` rows are laid out
``[chosen; rejected]``.

Public functions (the trainers reach the losses only through these, so ``kernels="preference=..."`` decides what a
trainer runs): :func:`preference_loss` (DPO, CPO/SimPO/AlphaPO), :func:`orpo_loss`, :func:`kto_loss` and
:func:`kto_kl` (``losses.py``), :func:`linear_preference_loss` and :func:`linear_orpo_loss` (``linear.py``, each
with a fused head+loss mode: ``fused_head.py``), :func:`linear_kto_loss` (``linear_kto.py``, likewise); the sequence
helpers of ``sequence.py``; the loss-type names and checks the trainer configs use (``registry.py``, ``reference/``).

Backends of the ``preference`` op, for every request that is separable per pair or per example (DPO ``sigmoid hinge
ipo exo_pair robust discopop nca_pair bco_pair sppo_hard apo_zero apo_down sigmoid_norm``, any f-divergence they
allow; CPO ``sigmoid hinge ipo simpo``, AlphaPO included; ORPO; KTO ``kto`` and ``apo_zero_unpaired`` given the KL):
- ``reference``: ``reference/``, plain torch autograd;
- ``compiled``: the ``fusedrl::pair_preference_losses`` / ``fusedrl::unpaired_preference_losses`` custom ops
  (``fused.py``) running ``torch.compile`` of ``compiled.py``;
- ``triton``: the same custom ops running ``triton.py``: loss, rewards and gradient in one launch.
Both custom-op backends compute the gradient in the forward pass (it is ``[B]`` floats), so the backward is a
multiply. The batch-coupled requests (``aot``, ``aot_unpaired`` sort over the batch; ``sft`` is one batch mean;
multi-type lists (MPO); KTO's KL estimate, a batch mean) run ``torch.compile`` of the reference with compiled
autograd; a ``triton`` selection for them takes that path and logs why once (``dispatch.traced_backend``). So do
losses registered with ``fusedrl.register_preference_loss`` (``registry.py``): Python functions have no Triton
kernel; ``compiled`` traces them.
Benchmarks: ``benchmarks/ops/preference.py``.
"""

from fusedrl.ops import dispatch
from fusedrl.ops.preference.linear import (
    LinearORPOLoss,
    LinearPreferenceLoss,
    linear_orpo_loss,
    linear_preference_loss,
)
from fusedrl.ops.preference.linear_kto import LinearKTOLoss, linear_kto_loss
from fusedrl.ops.preference.losses import (
    KTOLoss,
    ORPOLoss,
    PreferenceLoss,
    kto_kl,
    kto_loss,
    orpo_loss,
    preference_loss,
)
from fusedrl.ops.preference.reference import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    KTO_LOSS_TYPES,
)
from fusedrl.ops.preference.registry import (
    check_registered_request,
    dpo_loss_types,
    needed_inputs,
)
from fusedrl.ops.preference.sequence import (
    ld_sequence_logps,
    log_sum_sq_probs,
    sequence_logps,
    token_mean_nll,
    wpo_pair_weights,
)

dispatch.register_op("preference", "preference losses (DPO/CPO/ORPO/KTO families) on sequence log-probs")

__all__ = [
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCE_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "KTOLoss",
    "LinearKTOLoss",
    "LinearORPOLoss",
    "LinearPreferenceLoss",
    "ORPOLoss",
    "PreferenceLoss",
    "check_registered_request",
    "dpo_loss_types",
    "kto_kl",
    "kto_loss",
    "ld_sequence_logps",
    "linear_kto_loss",
    "linear_orpo_loss",
    "linear_preference_loss",
    "log_sum_sq_probs",
    "needed_inputs",
    "orpo_loss",
    "preference_loss",
    "sequence_logps",
    "token_mean_nll",
    "wpo_pair_weights",
]
