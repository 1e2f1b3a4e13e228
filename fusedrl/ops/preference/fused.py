"""The custom ops of the ``preference`` op (its ``compiled`` and ``triton`` backends), defined with
``dispatch.define_op``: schema, fake and autograd here; the math in ``compiled.py`` and ``triton.py``.

Legend: B pairs, N unpaired examples.

- ``fusedrl::pair_preference_losses``: the pair-separable losses (DPO, CPO, ORPO; ``compiled.FORMULAS`` on
  ``compiled.SCORE_MAPS``) -> ``(losses, chosen_rewards, rejected_rewards, grad_chosen, grad_rejected)``, fp32 ``[B]``;
- ``fusedrl::unpaired_preference_losses``: KTO's per-example losses -> ``(losses, rewards, grad)``, fp32 ``[N]``.

Both backends compute the gradient in the forward pass (it is ``[B]`` or ``[N]`` floats, saved for the backward),
so the backward is a multiply and never launches a kernel. A Triton kernel that fails to build falls back to
``compiled`` (``dispatch.run_with_fallback``, through ``define_op``).
"""

from __future__ import annotations

import torch

from fusedrl.ops import dispatch
from fusedrl.ops.preference import compiled

_NUM_PAIR_PARAMS = 15  # parameters of compiled.pair_preference_losses
_NUM_UNPAIRED_PARAMS = 7  # parameters of compiled.unpaired_preference_losses


def _fake_pair(chosen_B, *_):
    return tuple(torch.empty_like(chosen_B, dtype=torch.float32) for _ in range(5))


def _pair_setup(ctx, inputs, output):
    _, chosen_rewards, rejected_rewards, grad_chosen, grad_rejected = output
    ctx.mark_non_differentiable(chosen_rewards, rejected_rewards, grad_chosen, grad_rejected)
    ctx.save_for_backward(grad_chosen, grad_rejected)


def _pair_backward(ctx, grad_losses, *_unused):
    grad_chosen, grad_rejected = ctx.saved_tensors
    g_chosen, g_rejected = grad_losses * grad_chosen, grad_losses * grad_rejected
    needs = ctx.needs_input_grad
    # The reference log-probs enter only as chosen - ref_chosen: their gradient is the negative.
    return (g_chosen, g_rejected, -g_chosen if needs[2] else None, -g_rejected if needs[3] else None,
            *([None] * (_NUM_PAIR_PARAMS - 4)))


pair_losses_op = dispatch.define_op(
    "pair_preference_losses", op="preference", compiled=compiled.pair_preference_losses,
    triton="fusedrl.ops.preference.triton:pair_preference_losses", fake=_fake_pair, backward=_pair_backward,
    setup_context=_pair_setup,
)


def _fake_unpaired(logps_N, *_):
    return tuple(torch.empty_like(logps_N, dtype=torch.float32) for _ in range(3))


def _unpaired_setup(ctx, inputs, output):
    _, rewards, grad = output
    ctx.mark_non_differentiable(rewards, grad)
    ctx.save_for_backward(grad)


def _unpaired_backward(ctx, grad_losses, *_unused):
    (grad,) = ctx.saved_tensors
    g_logps = grad_losses * grad
    return (g_logps, -g_logps if ctx.needs_input_grad[1] else None, *([None] * (_NUM_UNPAIRED_PARAMS - 2)))


unpaired_losses_op = dispatch.define_op(
    "unpaired_preference_losses", op="preference", compiled=compiled.unpaired_preference_losses,
    triton="fusedrl.ops.preference.triton:unpaired_preference_losses", fake=_fake_unpaired,
    backward=_unpaired_backward, setup_context=_unpaired_setup,
)
