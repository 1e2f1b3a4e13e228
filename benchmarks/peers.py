"""Input builders and the paths a case compares: each path does ONE forward+backward on prepared inputs.

Legend: N tokens, H hidden, V vocabulary, B sequences of T tokens.

Every path of a case gets the same inputs and the same fixed upstream gradients (``grad_logprobs_N``,
``grad_entropy_N``), i.e. the loss ``(logp * g1 + entropy * g2).sum()``, and leaves the input gradients in
``.grad`` (the runner clears them between iterations). A path's ``unavailable`` returns why it cannot run here (a
GPU-only peer on CPU, a peer not installed) or None. Peers are imported inside the paths, so a worker
process only loads what its path needs; fusedrl never imports them itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------------- inputs


@dataclass
class LinearInputs:
    hidden_NH: torch.Tensor
    weight_VH: torch.Tensor
    labels_N: torch.Tensor
    grad_logprobs_N: torch.Tensor
    grad_entropy_N: torch.Tensor
    # Path-owned buffers built on the first (untimed, warmup) call, e.g. the floor's [N, V] upstream gradient.
    cache: dict[str, torch.Tensor] = field(default_factory=dict)

    def zero_grad(self) -> None:
        self.hidden_NH.grad = None
        self.weight_VH.grad = None


@dataclass
class LogitsInputs:
    logits_BTV: torch.Tensor
    labels_BT: torch.Tensor
    grad_logprobs_BT: torch.Tensor
    grad_entropy_BT: torch.Tensor

    def zero_grad(self) -> None:
        self.logits_BTV.grad = None


def _labels(shape: tuple[int, ...], V: int, labelled_fraction: float, gen: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, V, shape, generator=gen)
    num_ignored = round(labels.numel() * (1.0 - labelled_fraction))
    # Random positions: fusedrl compacts labelled tokens wherever they are, so their layout does not matter.
    ignored = torch.randperm(labels.numel(), generator=gen)[:num_ignored]
    labels.view(-1)[ignored] = IGNORE_INDEX
    return labels


def linear_inputs(shape: Mapping[str, int], dtype: torch.dtype, *, labelled_fraction: float = 1.0) -> LinearInputs:
    N, H, V = shape["N"], shape["H"], shape["V"]
    gen = torch.Generator().manual_seed(0)
    hidden_NH = torch.randn(N, H, generator=gen).to(dtype).requires_grad_()
    # Logit std ~2, about what a trained LM head gives; it only matters for exp() underflow, not for timing.
    weight_VH = (torch.randn(V, H, generator=gen) * (2.0 / H**0.5)).to(dtype).requires_grad_()
    return LinearInputs(
        hidden_NH=hidden_NH,
        weight_VH=weight_VH,
        labels_N=_labels((N,), V, labelled_fraction, gen),
        grad_logprobs_N=torch.randn(N, generator=gen),
        grad_entropy_N=torch.randn(N, generator=gen),
    )


def logits_inputs(shape: Mapping[str, int], dtype: torch.dtype, *, labelled_fraction: float = 1.0) -> LogitsInputs:
    B, T, V = shape["B"], shape["T"], shape["V"]
    gen = torch.Generator().manual_seed(0)
    return LogitsInputs(
        logits_BTV=(torch.randn(B, T, V, generator=gen) * 2.0).to(dtype).requires_grad_(),
        labels_BT=_labels((B, T), V, labelled_fraction, gen),
        grad_logprobs_BT=torch.randn(B, T, generator=gen),
        grad_entropy_BT=torch.randn(B, T, generator=gen),
    )


INPUTS: dict[str, Callable[..., object]] = {"linear": linear_inputs, "logits": logits_inputs}


def _backward(logprobs: torch.Tensor, entropy: torch.Tensor | None, g_logp: torch.Tensor, g_ent: torch.Tensor) -> None:
    """Backward of ``(logprobs * g_logp + entropy * g_ent).sum()`` without building the sum."""
    if entropy is None:
        torch.autograd.backward(logprobs, g_logp)
    else:
        torch.autograd.backward((logprobs, entropy), (g_logp, g_ent))


# ------------------------------------------------------------------------------------------------------ linear paths


def fusedrl_linear(x: LinearInputs, *, with_entropy: bool, softcap: float | None = None) -> None:
    """fusedrl ``linear_token_logprobs``, compiled backend (explicit request: raises rather than falling back);
    ``softcap``: Gemma 2's final soft cap of the logits, on every tile."""
    import fusedrl

    with fusedrl.use_kernels(linear_logprobs="compiled"):
        out = fusedrl.linear_token_logprobs(x.hidden_NH, x.weight_VH, x.labels_N, with_entropy=with_entropy,
                                            softcap=softcap)
        logprobs, entropy = out if with_entropy else (out, None)
        _backward(logprobs, entropy, x.grad_logprobs_N, x.grad_entropy_N)


def trl_chunked(x: LinearInputs, *, with_entropy: bool, softcap: float | None = None) -> None:
    """``trl.kernels.ChunkedLogProbFunction`` called as TRL's fused LM-head forward calls it (``trl/trainer/utils.py``),
    with ``softcap`` as its ``final_logit_softcapping``.

    Same chunk size as TRL's trainers (``_CHUNKED_LOGPROB_CHUNK_SIZE`` = 32768 vocabulary columns; with its fixed
    4096-token tiles that is one ``[4096, V]`` tile at V = 32000). Like TRL, unlabelled positions are dropped only on
    Triton devices; on CPU every position is scored (``labels.clamp(min=0)``) and masked afterwards.
    """
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    mask_N = x.labels_N != IGNORE_INDEX
    compact = _use_triton(x.hidden_NH.device)
    outputs = ("entropy",) if with_entropy else ()
    logprobs, entropy, *_ = ChunkedLogProbFunction.apply(
        x.hidden_NH[mask_N] if compact else x.hidden_NH,
        x.weight_VH,
        None,
        x.labels_N[mask_N] if compact else x.labels_N.clamp(min=0),
        1.0,
        _CHUNKED_LOGPROB_CHUNK_SIZE,
        softcap,
        1.0,
        outputs,
    )

    def expand(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return t.new_zeros(mask_N.shape).masked_scatter(mask_N, t) if compact else t.masked_fill(~mask_N, 0)

    _backward(expand(logprobs), expand(entropy), x.grad_logprobs_N, x.grad_entropy_N)


def _torch_native_missing() -> str | None:
    if not hasattr(torch.nn.functional, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy with LinearCrossEntropyOptions"
    return None


def torch_native(x: LinearInputs, *, with_entropy: bool) -> None:
    """``F.linear_cross_entropy(reduction="none")`` with ``LinearCrossEntropyOptions()`` (chunked, "auto" policy):
    per-token ``-log p``, so the upstream gradient is ``-g``. Logprobs only: it has no entropy output."""
    if with_entropy:
        raise ValueError("torch_native computes no entropy")
    nll_N = torch.nn.functional.linear_cross_entropy(
        x.hidden_NH, x.weight_VH, x.labels_N, reduction="none", ignore_index=IGNORE_INDEX,
        options=torch.nn.LinearCrossEntropyOptions(),
    )
    torch.autograd.backward(nll_N, -x.grad_logprobs_N)


def _liger_missing() -> str | None:
    # Measured: on CPU tensors Liger's Triton launch raises "RuntimeError: 0 active drivers ([])".
    if not torch.cuda.is_available():
        return "Liger's fused linear cross-entropy is Triton-only; needs a GPU"
    return None


def liger(x: LinearInputs, *, with_entropy: bool) -> None:
    """Liger ``liger_fused_linear_cross_entropy(reduction="none")``: per-token ``-log p``, logprobs only."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if with_entropy:
        raise ValueError("liger computes no entropy")
    nll_N = liger_fused_linear_cross_entropy(
        x.hidden_NH, x.weight_VH, x.labels_N, ignore_index=IGNORE_INDEX, reduction="none"
    )
    torch.autograd.backward(nll_N, -x.grad_logprobs_N)


def naive_linear(x: LinearInputs, *, with_entropy: bool, softcap: float | None = None) -> None:
    """Full fp32 ``[N, V]`` logits (soft-capped with ``softcap``) then log_softmax / gather / entropy: fusedrl's
    reference, which is exactly that."""
    from fusedrl.ops.logprobs.reference import linear_token_logprobs_reference

    logprobs, entropy = linear_token_logprobs_reference(
        x.hidden_NH, x.weight_VH, x.labels_N, bias=None, temperature=1.0, ignore_index=IGNORE_INDEX,
        with_entropy=with_entropy, softcap=softcap,
    )
    _backward(logprobs, entropy, x.grad_logprobs_N, x.grad_entropy_N)


def floor(x: LinearInputs, *, with_entropy: bool, softcap: float | None = None) -> None:
    """The matmuls alone: ``(hidden @ W.T).backward(G)``, three N x V x H GEMMs; no softmax, no recompute, no cap
    (``softcap`` only adds elementwise work to the paths it is measured against).

    Its memory figure is not a target: it holds the ``[N, V]`` logits and its upstream gradient G is an input.
    """
    if "grad_logits_NV" not in x.cache:
        gen = torch.Generator().manual_seed(1)
        N, V = x.hidden_NH.shape[0], x.weight_VH.shape[0]
        x.cache["grad_logits_NV"] = torch.randn(N, V, generator=gen, dtype=x.hidden_NH.dtype)
    (x.hidden_NH @ x.weight_VH.T).backward(x.cache["grad_logits_NV"])


def labelled_rows_floor(cache: dict[str, torch.Tensor], hidden: torch.Tensor, weight_VH: torch.Tensor,
                        mask: torch.Tensor, ref_hidden: torch.Tensor | None = None,
                        ref_weight_VH: torch.Tensor | None = None) -> None:
    """The GEMM floor of a loss over the LM head's labelled positions: the M rows of ``hidden`` where ``mask``
    holds are gathered once into ``cache`` (untimed, first call), then ``(hidden_MH @ W.T).backward(G_MV)`` (logits,
    grad_hidden, grad_weight: 3 passes of M x V x H) and, given a reference, ``ref_hidden_MH @ ref_W.T`` under
    no_grad (the reference's 1 pass). No softmax, no recompute, no gather or scatter in the timed call.

    Gradients go to the cached rows and ``weight_VH``; the input's own ``.grad`` stays empty (the runner does not
    compare the floor's gradients: G is random). Its memory is not a target: it holds ``[M, V]`` logits, and G is an
    input."""
    if "hidden_MH" not in cache:
        gen = torch.Generator().manual_seed(1)
        cache["hidden_MH"] = hidden.detach()[mask].clone().requires_grad_()
        cache["grad_logits_MV"] = torch.randn(cache["hidden_MH"].shape[0], weight_VH.shape[0], generator=gen,
                                              dtype=hidden.dtype)
        if ref_hidden is not None:
            cache["ref_hidden_MH"] = ref_hidden[mask].clone()
    (cache["hidden_MH"] @ weight_VH.T).backward(cache["grad_logits_MV"])
    if ref_hidden is not None:
        with torch.no_grad():
            _ = cache["ref_hidden_MH"] @ ref_weight_VH.T


# ------------------------------------------------------------------------------------------------------ logits paths


def fusedrl_logits(x: LogitsInputs) -> None:
    """fusedrl ``token_logprobs_and_entropy``, compiled backend."""
    import fusedrl

    with fusedrl.use_kernels(logprobs="compiled"):
        logprobs, entropy = fusedrl.token_logprobs_and_entropy(x.logits_BTV, x.labels_BT)
        _backward(logprobs, entropy, x.grad_logprobs_BT, x.grad_entropy_BT)


def trl_logits(x: LogitsInputs) -> None:
    """TRL ``selective_log_softmax`` + ``entropy_from_logits`` on their CPU paths (the Triton one is CUDA/XPU only):
    a Python loop of ``logsumexp`` over the B sequences, and ``log_softmax`` over 128-row chunks for the entropy.
    Masked like TRL's trainers (``row_mask``) so ignored positions get zero gradient."""
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    mask_BT = x.labels_BT != IGNORE_INDEX
    logprobs = selective_log_softmax(x.logits_BTV, x.labels_BT.clamp(min=0), row_mask=mask_BT)
    entropy = entropy_from_logits(x.logits_BTV).masked_fill(~mask_BT, 0.0)
    _backward(logprobs, entropy, x.grad_logprobs_BT, x.grad_entropy_BT)


def reference_logits(x: LogitsInputs) -> None:
    """fusedrl's fp32 reference: full log_softmax, gather, entropy."""
    from fusedrl.ops.logprobs.reference import token_logprobs_reference

    logprobs, entropy = token_logprobs_reference(
        x.logits_BTV, x.labels_BT, temperature=1.0, ignore_index=IGNORE_INDEX, with_entropy=True
    )
    _backward(logprobs, entropy, x.grad_logprobs_BT, x.grad_entropy_BT)


@dataclass(frozen=True)
class PathSpec:
    run: Callable[..., None]
    label: str
    unavailable: Callable[[], str | None] = lambda: None


PATHS: dict[str, dict[str, PathSpec]] = {
    "linear": {
        "fusedrl": PathSpec(fusedrl_linear, "fusedrl compiled"),
        "trl_chunked": PathSpec(trl_chunked, "TRL ChunkedLogProbFunction"),
        "torch_native": PathSpec(torch_native, "torch F.linear_cross_entropy", _torch_native_missing),
        "liger": PathSpec(liger, "Liger fused linear CE", _liger_missing),
        "naive": PathSpec(naive_linear, "naive full logits"),
        "floor": PathSpec(floor, "floor: matmuls only"),
    },
    "logits": {
        "fusedrl": PathSpec(fusedrl_logits, "fusedrl compiled"),
        "trl": PathSpec(trl_logits, "TRL selective_log_softmax + entropy_from_logits"),
        "reference": PathSpec(reference_logits, "fusedrl reference"),
    },
}


# -------------------------------------------------------------------------------------------------- preference paths
# Legend: B pairs, T positions, H hidden, V vocabulary; the 2B rows are [chosen; rejected] (TRL's layout).


@dataclass
class PreferenceInputs:
    hidden_NTH: torch.Tensor  # policy last hidden states [2B, T, H], requires grad
    weight_VH: torch.Tensor  # policy LM head, requires grad
    ref_hidden_NTH: torch.Tensor  # reference model's hidden states, no grad
    ref_weight_VH: torch.Tensor  # the reference model's own (frozen) LM head, no grad
    labels_NT: torch.Tensor  # shifted labels, IGNORE_INDEX on each pair's prompt
    # Path-owned buffers built on the first (untimed, warmup) call: the floor's labelled rows and upstream gradient.
    cache: dict[str, torch.Tensor] = field(default_factory=dict)

    def zero_grad(self) -> None:
        self.hidden_NTH.grad = None
        self.weight_VH.grad = None
        for value in self.cache.values():
            value.grad = None


def preference_inputs(shape: Mapping[str, int], dtype: torch.dtype, *, prompt_fraction: tuple[float, float] = (0.4, 0.6)
                      ) -> PreferenceInputs:
    """Each pair's prompt takes a uniform 40-60% of T (~half), is the same for its chosen and rejected rows and
    carries IGNORE_INDEX; the completions fill the rest of the row. The reference model is the policy's starting
    point, so its hidden states and head are the policy's plus small noise."""
    B, T, H, V = shape["B"], shape["T"], shape["H"], shape["V"]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * (2.0 / H**0.5)  # logit std ~2, as in linear_inputs
    labels = torch.randint(0, V, (2 * B, T), generator=gen)
    low, high = prompt_fraction
    prompt_B = (T * (low + (high - low) * torch.rand(B, generator=gen))).long()
    labels[torch.arange(T) < prompt_B.repeat(2).unsqueeze(1)] = IGNORE_INDEX
    return PreferenceInputs(
        hidden_NTH=hidden.to(dtype).requires_grad_(),
        weight_VH=weight.to(dtype).requires_grad_(),
        ref_hidden_NTH=(hidden + 0.1 * torch.randn(hidden.shape, generator=gen)).to(dtype),
        ref_weight_VH=(weight + 0.01 * torch.randn(weight.shape, generator=gen) / H**0.5).to(dtype),
        labels_NT=labels,
    )


INPUTS["preference"] = preference_inputs
PREFERENCE_BETA = 0.1


def _fusedrl_preference(x: PreferenceInputs, fused: bool) -> None:
    import fusedrl

    with fusedrl.use_kernels(linear_logprobs="compiled", preference="compiled"):
        out = fusedrl.linear_preference_loss(
            x.hidden_NTH, x.weight_VH, x.labels_NT, ref_hidden=x.ref_hidden_NTH, ref_weight=x.ref_weight_VH,
            loss_type="sigmoid", beta=PREFERENCE_BETA, fused=fused,
        )
        out.loss.backward()


def fusedrl_preference(x: PreferenceInputs) -> None:
    """``fusedrl.linear_preference_loss`` (DPO sigmoid), compiled backends, ``fused=True`` as the trainers run it:
    each logits tile's gradient is taken in forward (3 policy head passes)."""
    _fusedrl_preference(x, fused=True)


def fusedrl_preference_recompute(x: PreferenceInputs) -> None:
    """The same with ``fused=False``: per-token log-probs whose backward recomputes each tile (4 passes)."""
    _fusedrl_preference(x, fused=False)


def liger_preference(x: PreferenceInputs) -> None:
    """``liger_kernel.chunked_loss.LigerFusedLinearDPOLoss`` with its defaults (``compiled=True``, one pair per
    chunk, sums over the completion) and the reference model's hidden states and head. Its first call compiles.

    Inputs are passed uncloned: on liger-kernel 0.8.5 (CPU) every input is bitwise unchanged after a
    forward+backward (checked when this path was written), and a clone would add its copy to Liger's time and peak.
    """
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=PREFERENCE_BETA, loss_type="sigmoid")
    loss, _ = loss_fn(x.weight_VH, x.hidden_NTH, x.labels_NT, ref_input=x.ref_hidden_NTH, ref_weight=x.ref_weight_VH)
    loss.backward()


def _naive_sequence_logps(hidden_NTH: torch.Tensor, weight_VH: torch.Tensor, labels_NT: torch.Tensor) -> torch.Tensor:
    logits_NTV = hidden_NTH @ weight_VH.T
    logp_NTV = torch.log_softmax(logits_NTV.float(), dim=-1)
    mask_NT = labels_NT != IGNORE_INDEX
    token_NT = logp_NTV.gather(-1, labels_NT.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_NT * mask_NT).sum(-1)


def naive_preference(x: PreferenceInputs) -> None:
    """TRL-style: full ``[2B, T, V]`` logits, log_softmax, gather, masked sum, then ``-logsig(beta * margin)``; the
    reference the same under no_grad."""
    logps_N = _naive_sequence_logps(x.hidden_NTH, x.weight_VH, x.labels_NT)
    with torch.no_grad():
        ref_logps_N = _naive_sequence_logps(x.ref_hidden_NTH, x.ref_weight_VH, x.labels_NT)
    chosen, rejected = (logps_N - ref_logps_N).chunk(2)
    loss = -torch.nn.functional.logsigmoid(PREFERENCE_BETA * (chosen - rejected)).mean()
    loss.backward()


def floor_preference(x: PreferenceInputs) -> None:
    """The GEMMs any DPO-from-hidden-states method must do (:func:`labelled_rows_floor`): the policy head's 3 passes
    and the reference head's 1 over the labelled (completion) positions, ~half of the 2B x T rows."""
    labelled_rows_floor(x.cache, x.hidden_NTH, x.weight_VH, x.labels_NT != IGNORE_INDEX,
                        ref_hidden=x.ref_hidden_NTH, ref_weight_VH=x.ref_weight_VH)


PATHS["preference"] = {
    "fusedrl": PathSpec(fusedrl_preference, "fusedrl compiled, fused head+loss"),
    "fusedrl_recompute": PathSpec(fusedrl_preference_recompute, "fusedrl compiled, recompute backward (fused=False)"),
    "liger": PathSpec(liger_preference, "Liger LigerFusedLinearDPOLoss"),
    "naive": PathSpec(naive_preference, "naive TRL-style full logits"),
    "floor": PathSpec(floor_preference, "floor: 3 + 1 GEMM passes over the labelled rows"),
}
