"""GAE benchmark inputs and paths, registered into ``peers.INPUTS`` / ``peers.PATHS`` under "gae".

Legend: B sequences, T positions.

GAE has no backward (PPO computes it under no_grad), so each path runs one forward on the same inputs. The rows
are right-padded completions, as in a PPO batch: lengths uniform in [T/4, T]. The peer is the reference loop over
T (``fusedrl.ops.gae.reference``, vectorised over B): the textbook way to write GAE. (TRL 1.16 ships no PPO trainer
and no GAE to compare with.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from benchmarks import peers


@dataclass
class GAEInputs:
    rewards_BT: torch.Tensor
    values_BT: torch.Tensor
    mask_BT: torch.Tensor

    def zero_grad(self) -> None:
        """Nothing to clear: no path computes gradients."""


def gae_inputs(shape: Mapping[str, int], dtype: torch.dtype) -> GAEInputs:
    B, T = shape["B"], shape["T"]
    gen = torch.Generator().manual_seed(0)
    lengths_B = torch.randint(T // 4, T + 1, (B,), generator=gen)
    mask_BT = torch.arange(T) < lengths_B.unsqueeze(1)
    # Sparse rewards like an RLHF batch would be wasted detail here: the cost does not depend on the values.
    return GAEInputs(
        rewards_BT=torch.randn(B, T, generator=gen).to(dtype),
        values_BT=torch.randn(B, T, generator=gen).to(dtype),
        mask_BT=mask_BT,
    )


GAMMA, LAM = 1.0, 0.95  # fusedrl.gae's defaults


def fusedrl_gae(x: GAEInputs) -> None:
    """``fusedrl.gae``, compiled backend (explicit request: raises rather than falling back)."""
    import fusedrl

    with fusedrl.use_kernels(gae="compiled"):
        fusedrl.gae(x.rewards_BT, x.values_BT, x.mask_BT, gamma=GAMMA, lam=LAM)


def loop_gae(x: GAEInputs) -> None:
    """The reverse Python loop over T (fusedrl's reference)."""
    from fusedrl.ops.gae.reference import gae_reference

    gae_reference(x.rewards_BT, x.values_BT, x.mask_BT, gamma=GAMMA, lam=LAM)


peers.INPUTS["gae"] = gae_inputs
peers.PATHS["gae"] = {
    "fusedrl": peers.PathSpec(fusedrl_gae, "fusedrl compiled"),
    "loop": peers.PathSpec(loop_gae, "Python loop over T (reference)"),
}
