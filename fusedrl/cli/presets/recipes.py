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

# The demo's second stage: GRPO from the DPO-trained policy above (fusedrl.GRPOTrainer, default kernels, model seed 0,
# one torch thread). DPO from random init makes a poor sampler: it ranks answers (0.996 held-out reward accuracy) but
# greedy decoding gets 2.4% of the 553 training problems right, and at T = 1.5 the exact answer + EOS has probability
# < 1e-4 on 310 of them (195 put p > 0.999 on a junk first token "F"), 1e-4..1e-2 on 98 and >= 1e-2 on 145.
# Why the previous recipe (16 problems drawn at random, beta 0, 300 steps, otherwise as below) missed: a random pool
# holds only 4-5 problems whose answer is ever sampled, and within ~60 steps the policy collapsed (entropy 0.36 ->
# 0.02-0.13, 91-100% of groups with zero reward spread from step 40 on seed 0). digit_accuracy pays 0.5 for "first digit
# + junk" ("1F" for 16) or "first digit + EOS" ("2" for 27) on the unreachable problems, and through the shared weights
# those modes, or one learned answer ("11", "31"), spread to the reachable problems too. A group that samples one
# wrong answer 8 times has no spread, hence no gradient, and with beta = 0 nothing pulls it back: the run is dead after
# step ~60, with 1, 2 or 5 problems learned by chance. GRPO seed 0/1/2 gave rises 0.086 / -0.003 / 0.240 (the
# refactor's slightly different DPO policy is what moved seed 0 under 0.1; before it, 0.105).
# What fixes it (300 steps, seeds 0/1/2, rise = accuracy of the last 60 steps minus that of the first 30):
# - beta = 0.2, the k3 KL to the DPO policy: its gradient exists in zero-spread groups and keeps the sampler close to
#   the DPO policy on problems the reward says nothing about. Alone: 0.228 / 0.102 / 0.236 (random pool).
# - the pool: the first 16 problems of the seed's shuffled train split whose exact answer the DPO policy samples with
#   probability in ``answer_prob_range`` at the sampling temperature (``demo.grpo_prompts``: one teacher-forced
#   forward over the 553 problems, 0.2 CPU s, 1.9 when the compiled log-prob op is built first): GRPO can only
#   learn from groups where some sample earns the reward.
#   With beta 0.2: 0.562 / 0.626 / 0.453. Without beta the filtered pool is not enough: 0.236 / 0.094 / -0.045
#   (range (0.01, 1)), and with the exact-answer reward alone 2 of 10 runs collapsed (seeds 2 and 3 on a DPO policy
#   trained with ``--kernels all=reference``: 0.199 -> 0.000 and 0.153 -> 0.064).
# - temperature 1.5 (the peaked prompts still sample some digits) and lr 3e-4 (1e-3 collapsed the entropy) stay.
# Tried and worse without beta (rises for seeds 0/1/2 unless noted, random pool): lr 1e-4 0.174 / 0.075 / 0.206;
# scale_rewards="none" with reward weights (1, 0.1) 0.247 / 0.120 / 0.273 / 0.059 / 0.026 (seeds 0-4);
# scale_rewards="batch" 0.120 / 0.120 / 0.060; num_generations 16 0.046 / 0.017 / -0.001; temperature 2.0 0.088 /
# 0.078 / 0.056; exact-answer reward alone 0.029 / -0.003 / -0.003; accuracy + format 0 accuracy at the end on all
# three (format pays for any integer: the policy settles on "2222").
# 240 steps instead of 300: with a constant lr a 240-step run is exactly the first 240 steps of a 300-step one (checked:
# identical windows), and the rise at 240 is already >= 0.32 on all 10 runs below, for 29.7 CPU s on average instead
# of 35.1 (the reference forward adds ~20%: 28.9 CPU s at 300 steps without it; the old recipe took 31-34).
# Exact-answer accuracy (sampled at T = 1.5), mean over 30-step windows, by GRPO seed (prompt pool and sampling);
# rise = mean of the last two windows minus the first; greedy accuracy on the 16 prompts before -> after; CPU and
# wall seconds of the 240 training steps on the 2-core machine (one torch thread, load ~3 from other jobs):
#   steps      1-30  31-60  61-90 91-120 121-150 151-180 181-210 211-240   rise       greedy   CPU s  wall s
#   the seed-0 demo DPO policy (`make demo`'s):
#   seed 0    0.079  0.203  0.271  0.353   0.390   0.457   0.492   0.555  0.444  0.06 -> 0.75   29.8   30.4
#   seed 1    0.126  0.217  0.296  0.391   0.500   0.506   0.648   0.726  0.561  0.19 -> 0.81   29.3   29.5
#   seed 2    0.132  0.207  0.275  0.390   0.474   0.453   0.458   0.481  0.338  0.25 -> 0.75   29.0   29.4
#   seed 3    0.084  0.192  0.278  0.339   0.372   0.378   0.386   0.445  0.332  0.00 -> 0.62   28.8   29.2
#   seed 4    0.098  0.121  0.149  0.254   0.308   0.410   0.398   0.442  0.322  0.06 -> 0.62   31.7   32.0
#   the same DPO recipe trained with --kernels all=reference (numerically different: eval loss 0.034 vs 0.064):
#   seed 0    0.131  0.197  0.265  0.390   0.453   0.514   0.574   0.593  0.452  0.12 -> 0.56   30.3   30.7
#   seed 1    0.189  0.325  0.426  0.458   0.567   0.623   0.657   0.703  0.491  0.38 -> 0.88   29.9   30.4
#   seed 2    0.189  0.324  0.325  0.306   0.428   0.524   0.619   0.690  0.465  0.19 -> 0.88   29.8   30.5
#   seed 3    0.167  0.233  0.320  0.355   0.432   0.539   0.637   0.656  0.480  0.19 -> 0.75   28.8   29.3
#   seed 4    0.122  0.309  0.451  0.516   0.550   0.562   0.578   0.584  0.459  0.06 -> 0.62   28.4   28.6
GRPO_DEMO_RECIPE: dict = {
    "dataset": "arithmetic",
    "num_prompts": 16,
    # p(exact answer + EOS) at the sampling temperature under the DPO policy: sampled right now and then, not solved.
    "answer_prob_range": (0.01, 0.5),
    "reward_funcs": ["accuracy", "digit_accuracy"],
    "config": {
        "learning_rate": 3e-4,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "num_generations": 8,
        "per_device_train_batch_size": 64,
        "max_completion_length": 4,
        "temperature": 1.5,
        "beta": 0.2,
        "loss_type": "dapo",
        "max_steps": 240,
        "logging_steps": 10,
        "seed": 0,
        "bf16": False,
        "activation_checkpointing": False,
    },
    "curve_window": 30,
    # The accuracy over the last 60 steps must exceed that of the first 30 by this much.
    "target_accuracy_rise": 0.1,
}
