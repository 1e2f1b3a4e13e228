"""A new trainer in one file: a ``FusedConfig`` subclass with the method's fields and a ``FusedTrainer`` subclass
with its ``compute_loss``. The method is SLiC-HF (https://arxiv.org/abs/2305.10425), a reference-free ranking
calibration: a hinge on the sequence log-prob margin of each pair plus an NLL term on the chosen completion::

    loss = mean_B relu(delta - (logp_chosen - logp_rejected)) + nll_weight * nll(chosen)

Everything else comes from the base (see docs/extending.md): model loading, the pad token, kernels selection
(``--kernels``), the fused LM head (``token_logprobs``: per-token log-probs without ``[N, T, V]`` logits),
metrics logging, and ``transformers.Trainer`` itself (optimizer, schedule, accumulation, checkpoints).
Trains the ``tiny`` preset on the ``arithmetic`` preset for a few steps (about 10 s on 2 CPU cores)::

    python examples/custom_trainer.py --max_steps 20
"""

from __future__ import annotations

import argparse
import math
import tempfile
from dataclasses import dataclass, field

import torch
from transformers import PrinterCallback

from fusedrl.cli.presets import build_tokenizer, load_preset_dataset, load_preset_model
from fusedrl.ops.preference import sequence_logps, token_mean_nll
from fusedrl.trainers import FusedConfig, FusedTrainer
from fusedrl.trainers.head import IGNORE_INDEX
from fusedrl.trainers.models import tokenizer_of
from fusedrl.trainers.preference.data import TOKENIZED_COLUMNS, PreferenceCollator, prepare_preference_dataset


@dataclass
class SLiCConfig(FusedConfig):
    """``FusedConfig`` (TrainingArguments + ``kernels``, ``model_init_kwargs``, ...) plus SLiC-HF's fields."""

    delta: float = field(default=1.0, metadata={"help": "Target margin of logp_chosen - logp_rejected (nats)."})
    nll_weight: float = field(default=0.1, metadata={"help": "Weight of the chosen-completion NLL term."})
    max_length: int | None = field(default=64, metadata={"help": "Longest prompt + completion, cut beyond."})

    def __post_init__(self):
        if self.delta <= 0:
            raise ValueError(f"delta must be > 0, got {self.delta}")
        super().__post_init__()


class SLiCTrainer(FusedTrainer):
    """SLiC-HF on ``prompt``/``chosen``/``rejected`` rows; batches of B pairs are 2B rows ``[chosen; rejected]``."""

    def __init__(self, model, args: SLiCConfig, train_dataset, processing_class=None, eval_dataset=None,
                 callbacks=None):
        # 1. before Trainer.__init__: load the model (a path or an instance) and give the tokenizer a pad token.
        model, processing_class = self._setup_model(model, args, processing_class, peft_config=None, ref_model=None,
                                                    quantization_config=None)
        tokenizer = tokenizer_of(processing_class)

        def prepare(dataset, name):  # tokenize prompt/chosen/rejected (TRL's DPO tokenization), drop overlong rows
            return prepare_preference_dataset(dataset, tokenizer, max_length=args.max_length,
                                              truncation_mode="keep_start", max_positions=None, name=name)

        super().__init__(
            model=model, args=args, processing_class=processing_class, callbacks=callbacks,
            data_collator=PreferenceCollator(tokenizer.pad_token_id, args.max_length),
            train_dataset=prepare(train_dataset, "train"),
            eval_dataset=None if eval_dataset is None else prepare(eval_dataset, "eval"),
        )
        # 2. after it: no reference model (precompute=True: nothing will ask for reference log-probs), dropout off,
        # kernels and metrics set up.
        self._finish_setup(None, precompute=True)

    def _set_signature_columns_if_needed(self):
        # Trainer drops the columns the model's forward does not take; the collator needs the token-id columns.
        if self._signature_columns is None:
            self._signature_columns = list(TOKENIZED_COLUMNS)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:  # outputs would be logits, which the fused head never builds
            raise NotImplementedError("SLiCTrainer.compute_loss returns the loss only")
        # 3. the method: per-token log-probs of the completion tokens from the fused head, then the loss.
        mode = self._mode()
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, IGNORE_INDEX)
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        logps_NT = self.token_logprobs(model, model_inputs, labels).logps  # [2B, T - 1], 0 off the completion
        mask_NT = completion_mask[:, 1:].bool()
        num_pairs = logps_NT.shape[0] // 2
        chosen, rejected = sequence_logps(logps_NT, mask_NT).chunk(2)
        nll = token_mean_nll(logps_NT[:num_pairs], mask_NT[:num_pairs])
        hinge = torch.relu(self.args.delta - (chosen - rejected))
        loss = hinge.mean() + self.args.nll_weight * nll

        # 4. metrics: appended per step, averaged over processes and steps at each log (base.FusedTrainer.log).
        self.record(mode, "hinge_loss", self.gathered_mean(hinge))
        self.record(mode, "nll_loss", self.gathered_mean(nll.reshape(1)))
        self.record(mode, "logps/chosen", self.gathered_mean(chosen))
        self.record(mode, "logps/rejected", self.gathered_mean(rejected))
        self.record(mode, "rewards/accuracies", self.gathered_mean((chosen > rejected).float()))
        self.record_num_tokens(mode, inputs["attention_mask"])
        return loss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--delta", type=float, default=1.0)
    parser.add_argument("--nll_weight", type=float, default=0.1)
    parser.add_argument("--kernels", default=None, help="e.g. 'all=reference' (default: compiled on CPU)")
    parser.add_argument("--output_dir", default=None, help="default: a temporary directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Trains and returns ``{"losses": [per-step loss], "metrics": last logged metrics, "train_loss": float}``."""
    args = parse_args(argv)
    tokenizer = build_tokenizer()
    with tempfile.TemporaryDirectory() as scratch:
        config = SLiCConfig(
            output_dir=args.output_dir or scratch, delta=args.delta, nll_weight=args.nll_weight,
            max_steps=args.max_steps, learning_rate=1e-3, per_device_train_batch_size=8, max_length=32,
            logging_steps=1, seed=0, kernels=args.kernels,
            # CPU settings: fp32 (bf16 is slower on CPU) and no recomputation (the model fits in cache).
            bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no", disable_tqdm=True,
        )
        trainer = SLiCTrainer(
            model=load_preset_model("tiny", tokenizer=tokenizer), args=config, processing_class=tokenizer,
            train_dataset=load_preset_dataset("arithmetic", "train", n=8 * args.max_steps),
        )
        trainer.remove_callback(PrinterCallback)  # the per-step table below replaces the raw log dicts
        result = trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    losses = [entry["loss"] for entry in logs]
    print(f"SLiC-HF: delta={args.delta} nll_weight={args.nll_weight}")
    for entry in logs:
        print(f"step {entry['step']:3d}  loss {entry['loss']:.4f}  hinge {entry['hinge_loss']:.4f}  "
              f"nll {entry['nll_loss']:.4f}  accuracy {entry['rewards/accuracies']:.2f}")
    assert all(math.isfinite(loss) for loss in losses), losses
    return {"losses": losses, "metrics": logs[-1], "train_loss": result.training_loss}


if __name__ == "__main__":
    main()
