"""Online trainers that sample from the policy: GRPO, RLOO, PPO and Online DPO, with what they share: rollout
(generation), sampling (repeat sampler, prompt checks), scoring of completions, the value head and pairwise judges."""
