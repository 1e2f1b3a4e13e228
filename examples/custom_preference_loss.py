"""A new preference loss in two steps: register a function, then name it in ``DPOConfig(loss_type=...)``.

The loss here is DPO's sigmoid loss with a target margin ``gamma`` (as in SimPO's margin, but on the reference
log-ratios ``c = logp_chosen - ref_chosen``, ``r = logp_rejected - ref_rejected``)::

    loss = -logsigmoid(beta * (c - r) - gamma)

Any function ``fn(chosen_logratios, rejected_logratios, *, beta, **inputs) -> [B]`` works: it is differentiated by
autograd, traced by the ``compiled`` backend, and mixed with built-in losses in an MPO list with ``loss_weights``
(``--with_sft`` adds TRL's ``"sft"`` term). Trains the ``tiny`` preset on the ``arithmetic`` preset for a few steps
(about 10 s on 2 CPU cores)::

    python examples/custom_preference_loss.py --max_steps 20
"""

from __future__ import annotations

import argparse
import functools
import math
import tempfile

import torch
import torch.nn.functional as F
from transformers import PrinterCallback

import fusedrl
from fusedrl.cli.presets import build_tokenizer, load_preset_dataset, load_preset_model
from fusedrl.trainers import DPOConfig, DPOTrainer


def sigmoid_margin_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float,
                        gamma: float) -> torch.Tensor:
    """``[B]`` fp32 log-ratios -> ``[B]`` losses ``-logsigmoid(beta (c - r) - gamma)``."""
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios) - gamma)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--gamma", type=float, default=0.5, help="target margin of the registered loss")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--with_sft", action="store_true", help="MPO: add TRL's 'sft' term with weight 0.2")
    parser.add_argument("--kernels", default=None, help="e.g. 'all=reference' (default: compiled on CPU)")
    parser.add_argument("--output_dir", default=None, help="default: a temporary directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Trains and returns ``{"losses": [per-step loss], "metrics": last logged metrics, "train_loss": float}``."""
    args = parse_args(argv)
    # replace=True: main() may run twice in one process (the tests do).
    fusedrl.register_preference_loss("sigmoid_margin", functools.partial(sigmoid_margin_loss, gamma=args.gamma),
                                     description="DPO sigmoid loss with a target margin gamma", replace=True)
    loss_type, loss_weights = (["sigmoid_margin", "sft"], [1.0, 0.2]) if args.with_sft else (["sigmoid_margin"], None)

    tokenizer = build_tokenizer()
    with tempfile.TemporaryDirectory() as scratch:
        config = DPOConfig(
            output_dir=args.output_dir or scratch, loss_type=loss_type, loss_weights=loss_weights, beta=args.beta,
            max_steps=args.max_steps, learning_rate=1e-3, per_device_train_batch_size=8, max_length=32,
            logging_steps=1, seed=0, kernels=args.kernels,
            # CPU settings: fp32 (bf16 is slower on CPU) and no recomputation (the model fits in cache).
            bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no", disable_tqdm=True,
        )
        trainer = DPOTrainer(
            model=load_preset_model("tiny", tokenizer=tokenizer), args=config, processing_class=tokenizer,
            train_dataset=load_preset_dataset("arithmetic", "train", n=8 * args.max_steps),
        )
        trainer.remove_callback(PrinterCallback)  # the per-step table below replaces the raw log dicts
        result = trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    losses = [entry["loss"] for entry in logs]
    print(f"loss_type={loss_type} loss_weights={loss_weights} gamma={args.gamma} beta={args.beta}")
    for entry in logs:
        print(f"step {entry['step']:3d}  loss {entry['loss']:.4f}  reward accuracy "
              f"{entry['rewards/accuracies']:.2f}  margin {entry['rewards/margins']:+.4f}")
    assert all(math.isfinite(loss) for loss in losses), losses
    return {"losses": losses, "metrics": logs[-1], "train_loss": result.training_loss}


if __name__ == "__main__":
    main()
