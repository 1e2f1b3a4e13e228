"""The measured DPO recipe for `make demo`: preset ``demo`` on dataset ``arithmetic``.

Checked with TRL 1.16's own ``DPOTrainer`` (torch 2.13 CPU, fp32, ``torch.set_num_threads(1)``, on a 2-core Xeon with
AVX-512 shared with other jobs at load 3-9, so CPU seconds are the figure to trust: an idle core gives about the same
wall time). Held-out reward accuracy is the fraction of the 256 test pairs (57 unseen problems) with
``beta * ((logp_c - ref_c) - (logp_r - ref_r)) > 0``, from TRL's ``eval_rewards/accuracies`` and recomputed
independently after training (identical). Model seed = data seed:

    step              100    200    300    400    500    600    700    800
    CPU s (seed 0)    9.6   18.5   27.2   35.5   44.0   52.9   61.5   70.1   (evaluation included)
    seed 0          0.820  0.871  0.820  0.891  0.965  0.961  0.992  0.984
    seed 1          0.770  0.863  0.926  0.953  0.949  0.957  0.973  0.969
    seed 2          0.871  0.898  0.945  0.992  0.984  0.988  0.988  0.988
    seed 3          0.867  0.863  0.977  0.957  0.992  1.000  1.000  1.000
    seed 4          0.723  0.859  0.832  0.828  0.910  0.965  0.980  0.980

The conversational format (chat template, 13 instead of 10 tokens a sequence) is slower to learn: 0.895 at step 600,
0.945 at 800 (seed 0, 87 CPU s). Two torch threads on the shared machine spent 229 CPU s on the first 100 steps
(OpenMP threads spinning for a core), hence one thread.

Sweeps that set these values (all max_operand=19 unless noted; accuracy at the last step):
- lr 3e-3 is too high: 0.71-0.81 after 1000 steps; 1e-3 converges (SFT probe: 3e-3 had held-out exact match 0.18
  after 1000 steps, 1e-3 0.985 after 1600).
- beta 0.5 instead of 0.1 helped at lr 3e-3 (0.81 vs 0.71) but not at 1e-3 (0.82 vs 0.81), off_by_one included.
- Operands up to 99 (``arithmetic-hard``): 0.59-0.65 after 800-1200 steps; both digits must be computed.
- With ``off_by_one`` rejections, pure DPO stays below chance on those pairs (0.42-0.44 after 1500 steps, 0.81
  overall); adding TRL's ``"sft"`` term (``loss_type=["sigmoid", "sft"]``, i.e. RPO) learns them too (0.95 on
  off_by_one, 0.98 overall after 1000 steps, 87 CPU s), if the demo ever wants the harder mix.
- The prompt "What is 13+18?\n" instead of "13+18=" doubles the tokens and the step time.
"""

from __future__ import annotations

# TrainingArguments / DPOConfig field names (TRL 1.16, transformers 5.23) so `DPOConfig(**DEMO_RECIPE["config"])`
# works for the TRL comparison run.
DEMO_RECIPE: dict = {
    "model": "demo",
    "dataset": "arithmetic",
    "torch_num_threads": 1,  # measured with 1; see above for 2 on a busy machine
    "model_seed": 0,
    "train_size": 25600,
    "eval_size": 256,
    "config": {
        "learning_rate": 1e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 30,
        "weight_decay": 0.0,
        "beta": 0.1,
        "loss_type": ["sigmoid"],
        "per_device_train_batch_size": 32,
        "per_device_eval_batch_size": 128,
        "max_steps": 800,
        "max_length": 32,
        "eval_steps": 100,
        "seed": 0,
        # TRL defaults that are wrong for a CPU demo: bf16=True (slower on CPU, and the reference is fp32) and
        # gradient_checkpointing=True (recomputes a model that fits in cache many times over). transformers 5.23 renamed
        # that field activation_checkpointing; TRL still sets the old name, which warns unless the new one is given.
        "bf16": False,
        "activation_checkpointing": False,
    },
    "target_heldout_reward_accuracy": 0.9,
}

# The demo's second stage: GRPO from the DPO-trained policy above (measured on the same 2-core machine under load,
# fusedrl.GRPOTrainer, default kernels, model seed 0). DPO from random init makes a poor sampler: it ranks answers
# (0.98 held-out reward accuracy) but greedy decoding gets 5% of the answers right, and for half the prompts it puts
# p > 0.999 on one junk token, so those groups have no reward spread and no gradient. What made the rise clear:
# - a fixed pool of 16 training problems (every problem seen ~150 times in 300 steps): the policy can learn its own
#   prompts; with the whole 553-problem split (each seen ~2 times) the reward stayed flat at every lr tried
#   (1e-4..1e-3), and TRL's GRPOTrainer gave the identical flat curve (same seed, same completions);
# - temperature 1.5, so the peaked prompts still sample some digits;
# - reward = accuracy + digit_accuracy (partial credit per right digit): exact answers alone are too rare at 5%;
# - lr 3e-4: 1e-3 collapsed the entropy (0.006 by step 180) and the accuracy with it.
# Exact-answer accuracy (sampled at T = 1.5), mean over 30-step windows, by GRPO seed (prompt draw and sampling; the
# DPO policy is the seed-0 demo's), and greedy accuracy on the 16 prompts before -> after:
#     steps      1-30  31-60  61-90 91-120 121-150 151-180 181-210 211-240 241-270 271-300   greedy       wall
#     seed 0    0.059  0.090  0.132  0.187   0.238   0.270   0.279   0.284   0.299   0.302   0.06 -> 0.31   90 s
#     seed 1    0.001  0.000  0.000  0.001   0.059   0.124   0.140   0.167   0.181   0.176   0.00 -> 0.19   39 s
#     seed 2    0.038  0.055  0.071  0.123   0.212   0.222   0.284   0.303   0.350   0.314   0.12 -> 0.25   49 s
# (wall: load ~8 for seed 0, ~3 for the others; about 40 CPU s each).
GRPO_DEMO_RECIPE: dict = {
    "dataset": "arithmetic",
    "num_prompts": 16,
    "reward_funcs": ["accuracy", "digit_accuracy"],
    "config": {
        "learning_rate": 3e-4,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "num_generations": 8,
        "per_device_train_batch_size": 64,
        "max_completion_length": 4,
        "temperature": 1.5,
        "beta": 0.0,
        "loss_type": "dapo",
        "max_steps": 300,
        "logging_steps": 10,
        "seed": 0,
        "bf16": False,
        "activation_checkpointing": False,
    },
    "curve_window": 30,
    # The accuracy over the last 60 steps must exceed that of the first 30 by this much.
    "target_accuracy_rise": 0.1,
}
