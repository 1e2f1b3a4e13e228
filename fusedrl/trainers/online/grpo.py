"""GRPOTrainer: TRL 1.16's GRPO recipe on fusedrl's fused LM head and loss.

``from fusedrl import GRPOTrainer, GRPOConfig`` replaces ``from trl import ...`` for prompt-only datasets (standard or
conversational) and reward functions or reward models: same constructor, config fields (``grpo_config.py`` lists
what is absent), sampler, generation, reward calling convention, advantages, loss and logged names. With the same
model, data, seed and config the completions and the logged losses match TRL's (tests/trainers/test_grpo_trainer.py runs
both). What differs is how the loss is made: TRL patches the model's forward with a chunked head; here the policy
loss is ``fusedrl.linear_policy_loss`` on the unpatched model's final hidden states, so no ``[B, T, V]`` logits.

One generation round (every ``steps_per_generation * num_iterations`` micro-steps; ``_prepare_inputs``):

1. the sampler yields ``generation_batch_size`` rows per process, each prompt ``num_generations`` times in a row;
2. ``rollout.generate_completions`` samples one completion per row (KV cache on, masks up to the first EOS); with
   ``tools``, ``environment_factory`` or a ``rollout_func``, ``agents/rollouts.py`` runs the round instead (tool
   turns, environments, the tool mask that keeps tool results out of the loss);
3. without grad: old log-probs when the round outlives one optimizer step (``num_iterations > 1`` or more
   micro-batches than accumulation steps), reference log-probs when ``beta != 0``;
4. every reward scores every completion (``rewards/``); the weighted sum gives group advantages
   (``fusedrl.group_advantages``);
5. the rows are shuffled and cut into ``steps_per_generation`` micro-batches, consumed by ``compute_loss``:
   a policy forward to the last hidden states, then ``fusedrl.linear_policy_loss`` (the ``loss_type``'s objective
   and aggregation, k3 KL, the entropy bonus, the off-policy sequence mask) and TRL's metrics (``grpo_loss.py``:
   the loss-side pieces).

A checkpoint inside a round also holds the round (``resume.py``): a resumed run finishes it rather than sampling a
new one from moved weights (TRL 1.16 does), so it repeats the uninterrupted run bitwise.

Legend: B completions in a micro-batch, P prompt positions, C completion positions, H hidden, V vocabulary.
"""

from __future__ import annotations

import math
import time

import torch
from accelerate.utils import gather, gather_object, is_peft_model, set_seed
from datasets import IterableDataset

from fusedrl.ops.logprobs import linear_token_logprobs
from fusedrl.ops.policy import linear_policy_loss
from fusedrl.trainers.adapters.joint_rollout import JointRollouts, examples_batch
from fusedrl.trainers.base import FusedTrainer
from fusedrl.trainers.data.validation import check_prompt_dataset
from fusedrl.trainers.data.vision import (
    check_vision_trainer,
    collate_vision,
    is_vision_processor,
    row_images,
    suppress_image_tokens,
    text_tokenizer,
)
from fusedrl.trainers.head import IGNORE_INDEX
from fusedrl.trainers.models import tokenizer_of
from fusedrl.trainers.online.agents import (
    EMPTY_PROMPT,
    AgentAttributes,
    AgentRollouts,
    environment_prompts,
    row_extra_columns,
)
from fusedrl.trainers.online.common import RewardAttributes
from fusedrl.trainers.online.engine_config import continuous_batching_config, refuse_unsupported_engine
from fusedrl.trainers.online.grpo_config import GRPOConfig
from fusedrl.trainers.online.grpo_loss import (
    TOKEN_NORMALISED_LOSS_TYPES,
    GRPOLossTerms,
    loss_mask,
    loss_type_options,
)
from fusedrl.trainers.online.grpo_scoring import (
    GroupScoring,
    completion_logs,
    completion_logs_state,
    restore_completion_logs,
)
from fusedrl.trainers.online.grpo_setup import (
    cast_lm_head_to_fp32,
    check_liger_prompt_learning,
    check_reward_source,
)
from fusedrl.trainers.online.resume import RoundCheckpointing, RoundState
from fusedrl.trainers.online.rollout import eos_token_ids_of, generate_completions, trainer_sampling_config
from fusedrl.trainers.online.row_seeds import trainer_row_seeds
from fusedrl.trainers.online.sampling import (
    RepeatSampler,
    configure_streams,
    identity_collator,
    print_completions,
    repeated_stream,
    shuffle_rows,
    split_rows,
    streamed_eval_dataloader,
)
from fusedrl.trainers.rewards import (
    RewardLogBuffer,
    prepare_reward_models,
    resolve_rewards,
    reward_weights_tensor,
    score_completions,
)


def _grpo_region(hidden_BCH, weight_VH, bias_V, completion_ids_BC, mask_BC, old_logps_BC, advantages_B, ref_logps_BC,
                 normaliser, entropy_coef, args: GRPOConfig, softcap: float | None = None, entropy_threshold=None):
    """The loss region (compiled whole with ``compile=True``): completion hidden states -> fused head -> TRL's
    GRPO loss (``linear_policy_loss(fused=True)``: loss, gradient, entropy and clip counts from one pass over each
    logits tile, 3 head passes), with TRL's ratio-weighted KL when ``use_bias_correction_kl`` and the entropy bonus
    (``entropy_coef``: 0.0 or a 0-d tensor, ``grpo_loss.py``). The top-entropy mask (a quantile over the batch)
    takes the unfused path (``entropy_threshold``: its quantile over every process, ``grpo_loss.py``)."""
    return linear_policy_loss(
        hidden_BCH, weight_VH, completion_ids_BC, mask_BC, old_logps_BC, advantages_B, bias=bias_V,
        temperature=args.temperature, ref_logps_BT=ref_logps_BC, beta=args.beta,
        ratio_weighted=args.use_bias_correction_kl, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon if args.epsilon_high is None else args.epsilon_high, delta=args.delta,
        importance_sampling_level=args.importance_sampling_level, loss_type=args.loss_type,
        max_completion_length=args.max_completion_length, num_items_in_batch=normaliser,
        top_entropy_quantile=args.top_entropy_quantile, entropy_coef=entropy_coef, **loss_type_options(args),
        **({} if entropy_threshold is None else {"entropy_threshold": entropy_threshold}),
        off_policy_mask_threshold=args.off_policy_mask_threshold, fused=True, softcap=softcap,
    )


class GRPOTrainer(GRPOLossTerms, GroupScoring, RewardAttributes, AgentAttributes, RoundCheckpointing, FusedTrainer):
    """Group Relative Policy Optimization (https://huggingface.co/papers/2402.03300), as ``trl.GRPOTrainer`` 1.16.

    ``model``: a path or a causal LM (or a PeftModel). ``reward_funcs``: one or a list of registered names
    (``"accuracy"``), callables ``(prompts, completions, completion_ids, **columns) -> list[float | None]``,
    sequence-classification models or their paths; None uses ``args.reward_funcs``. ``train_dataset``: a
    ``Dataset`` or streamed ``IterableDataset`` (then ``max_steps`` is required) with a ``prompt`` column; its other
    columns reach the reward functions. ``eval_dataset``: the same, or a dict of them (an ``IterableDatasetDict``).
    ``reward_processing_classes``: tokenizers of reward models (one per reward, None entries allowed).
    ``tools``, ``environment_factory``, ``rollout_func``: agentic rollouts, as TRL 1.16 (``agents/rollouts.py``);
    with an ``environment_factory`` that owns the data, ``train_dataset`` may be None (then ``max_steps`` is required).
    """

    loss_is_scaled_for_ga = True  # most loss types divide by the accumulation steps, dapo/cispo/vespo by tokens
    config_class = GRPOConfig
    method = "GRPO"

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, tools=None, rollout_func=None,
                 environment_factory=None):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = self.config_class(f"{name.rstrip('/').split('/')[-1] or 'model'}-{self.method}")
        environment_data = train_dataset is None  # the environment's reset supplies the prompts
        if environment_data:
            train_dataset = environment_prompts(environment_factory, args)
        if self._joint_datasets(args, train_dataset, eval_dataset) is train_dataset:
            # A stream carries the prompt repeats (repeated_stream): TRL's dispatch refusal comes first, as in TRL.
            configure_streams(args, train_dataset, eval_dataset)
            has_environments = environment_factory is not None
            if not environment_data:
                check_prompt_dataset(train_dataset, "train_dataset", streamed_ok=True,
                                     prompt_optional=has_environments, images_ok=True)
            check_prompt_dataset(eval_dataset, "eval_dataset", streamed_ok=True, prompt_optional=has_environments,
                                 images_ok=True)
        else:  # several adapters trained together: one dataset per adapter (adapters/joint_rollout.py)
            for name in args.model_adapter_name:
                check_prompt_dataset(train_dataset[name], f"train_dataset[{name!r}]")
                check_prompt_dataset(None if eval_dataset is None else eval_dataset[name], f"eval_dataset[{name!r}]")
        if environment_factory is None:  # an environment may own the reward: checked once it is probed
            check_reward_source(reward_funcs, args.reward_funcs)
        check_liger_prompt_learning(args, model, peft_config)

        set_seed(args.seed)  # PEFT initialises adapters randomly
        model, processing_class = self._setup_model(model, args, processing_class, peft_config=peft_config,
                                                    ref_model=None, quantization_config=quantization_config,
                                                    reference=args.beta != 0.0)
        if args.sync_ref_model and (args.beta == 0.0 or (is_peft_model(model) and args.ref_adapter_name is None)):
            raise ValueError("sync_ref_model=True needs a separate reference model: set beta != 0 and train without PEFT "
                             "(a PEFT reference is the adapter-disabled policy) or name a reference adapter with "
                             "ref_adapter_name, or set sync_ref_model=False")
        if getattr(args, "cast_lm_head_to_fp32", False):  # before the reference copy (_finish_setup) is made
            cast_lm_head_to_fp32(model)
        self._tokenizer = tokenizer_of(processing_class)
        self._is_vlm = is_vision_processor(processing_class)  # TRL's name
        refuse_unsupported_engine(args, type(self).__name__, vision=self._is_vlm)
        self.continuous_batching_config = continuous_batching_config(args)  # TRL's attribute; None when off
        self.use_vllm = False  # TRL's attribute (use_vllm=True was refused above)
        if self._is_vlm:
            check_vision_trainer(args)
            text_tokenizer(processing_class, self._tokenizer)  # tool parsing reads the tokenizer's template
        self.agents = self.environments = None
        if rollout_func is not None and args.off_policy_mask_threshold is not None:
            raise ValueError("off_policy_mask_threshold with a rollout_func is not supported by fusedrl: TRL masks with "
                             "the rollout's own sampling log-probs there, fusedrl's mask reads the old policy's. Unset "
                             "off_policy_mask_threshold, or sample without rollout_func")
        if tools or environment_factory is not None or rollout_func is not None:
            self.agents = AgentRollouts(self._tokenizer, tools=tools, environment_factory=environment_factory,
                                        rollout_func=rollout_func,
                                        max_tool_calling_iterations=args.max_tool_calling_iterations,
                                        chat_template_kwargs=args.chat_template_kwargs)
        user_rewards = reward_funcs if reward_funcs is not None else args.reward_funcs
        if environment_factory is not None and not self.agents.reward_functions:
            check_reward_source(user_rewards, None)
        self.rewards = [] if user_rewards is None and environment_factory is not None else resolve_rewards(
            user_rewards, reward_processing_classes, model_init_kwargs=args.model_init_kwargs,
            trust_remote_code=args.trust_remote_code)
        self.reward_weights = reward_weights_tensor(args.reward_weights, len(self.rewards))
        if self.agents is not None and self.agents.reward_functions:  # environments' own rewards: weight 1 each
            self.rewards += resolve_rewards(self.agents.reward_functions)
            self.reward_weights = torch.cat([self.reward_weights, torch.ones(len(self.agents.reward_functions))])
        self.reward_func_names = [reward.name for reward in self.rewards]
        self.num_generations = args.num_generations
        self.num_generations_eval = args.num_generations_eval or args.num_generations
        self.eos_token_ids = eos_token_ids_of(model, self._tokenizer)
        self.generation_config = trainer_sampling_config(args, self._tokenizer, self.eos_token_ids,
                                                         args.max_completion_length)
        if self._is_vlm:
            suppress_image_tokens(self.generation_config, model)

        super().__init__(model=model, args=args, data_collator=identity_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers)

        self._setup_router_aux_loss(args)
        self._finish_setup(None, precompute=args.beta == 0.0)  # beta = 0: no reference model at all
        if args.sync_ref_model:
            self.add_callback(self.reference_sync_callback())
        self.rewards = prepare_reward_models(self.rewards, self.accelerator)
        self._step = 0  # micro-steps, counting accumulation
        self._init_entropy_control(args)
        self._buffered_inputs = None
        self._joint_rollouts = None if self._joint is None else JointRollouts(self, self._joint.names)
        self._step_time = 0.0
        self._logs = completion_logs(args.generation_batch_size)  # TRL's: the log_completions table
        self._reward_logs = RewardLogBuffer()  # log_extra / log_metric of the batch being scored
        self._start_async_loop(() if self.agents is None else self.agents.tools)
        # Each process its own sampling stream, as TRL (duplicate prompts across processes then differ).
        set_seed(args.seed, device_specific=True)

    # --- data ---------------------------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt", "image", "images"]

    def get_train_dataloader(self):
        # One batch is a whole generation round: steps_per_generation micro-batches of completions.
        if self._joint is not None:
            return self._joint.train_dataloader(self._train_batch_size * self.args.steps_per_generation,
                                                examples_batch)
        dataset = self.train_dataset
        if isinstance(dataset, IterableDataset):  # no sampler on a stream: the stream carries the sampler's order
            dataset = repeated_stream(dataset, self.num_generations,
                                      self.args.generation_batch_size // self.num_generations,
                                      self.args.num_iterations * self.args.steps_per_generation,
                                      shuffle=self.args.shuffle_dataset, seed=self.args.seed)
        return self._get_dataloader(dataset=dataset, description="Training",
                                    batch_size=self._train_batch_size * self.args.steps_per_generation,
                                    sampler_fn=self._get_train_sampler, is_training=True)

    def _get_train_sampler(self, dataset=None):
        return RepeatSampler(
            self.train_dataset if dataset is None else dataset, self.num_generations,
            batch_size=self.args.generation_batch_size // self.num_generations,
            repeat_count=self.args.num_iterations * self.args.steps_per_generation,
            shuffle=self.args.shuffle_dataset, seed=self.args.seed,
        )

    def _get_eval_sampler(self, eval_dataset):
        return RepeatSampler(eval_dataset, self.num_generations_eval, seed=self.args.seed)

    def get_eval_dataloader(self, eval_dataset=None):
        dataset = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else (
            self.eval_dataset if eval_dataset is None else eval_dataset)
        if isinstance(dataset, IterableDataset):  # no sampler on a stream: the stream carries the groups
            return streamed_eval_dataloader(self, dataset, self.num_generations_eval)
        return super().get_eval_dataloader(eval_dataset)

    def training_step(self, model, inputs, num_items_in_batch):
        start = time.perf_counter()
        output = super().training_step(model, inputs, num_items_in_batch)
        self._step += 1
        self._step_time += time.perf_counter() - start
        if self._step % self.current_gradient_accumulation_steps == 0:
            self.record("train", "step_time", self._step_time)
            self._step_time = 0.0
        return output

    def _prepare_inputs(self, generation_batch):
        """Training: generate and score a round once, serve its micro-batches; evaluation: one batch, no buffer."""
        if self._mode() == "eval":
            return self._generate_and_score(generation_batch)
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            if self._joint_rollouts is not None:  # each adapter samples its own round; steps train them together
                self._buffered_inputs = self._joint_rollouts.generate(generation_batch, self._scored_round,
                                                                      self.args.steps_per_generation)
            else:
                self._buffered_inputs = self._scored_round(generation_batch, self.args.steps_per_generation)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    # --- exact resume (online/resume.py): the step counter, the pending round, joint mode's RNG streams ----------

    def _round_state(self) -> RoundState:
        args = self.args
        inside_round = self._step % (args.steps_per_generation * args.num_iterations) != 0
        plan = {"per_device_train_batch_size": args.per_device_train_batch_size,
                "steps_per_generation": args.steps_per_generation, "num_iterations": args.num_iterations,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "num_generations": args.num_generations, "beta": args.beta, "world_size": args.world_size}
        return RoundState({"step": self._step, "completion_logs": completion_logs_state(self._logs)}, plan,
                          self._buffered_inputs if inside_round else None,
                          {} if self._joint_rollouts is None else self._joint_rollouts.state_tensors())

    def _restore_round(self, state: RoundState) -> None:
        self._step = state.counters["step"]
        restore_completion_logs(self._logs, state.counters.get("completion_logs", {}))
        self._buffered_inputs = state.pending  # None: _prepare_inputs samples a fresh round
        if self._joint_rollouts is not None:
            self._joint_rollouts.load_state_tensors(state.extra)

    # --- generation and scoring ---------------------------------------------------------------------------------

    def _scored_round(self, generation_batch, num_chunks: int) -> list[dict]:
        return split_rows(shuffle_rows(self._generate_and_score(generation_batch)), num_chunks)

    def _needs_old_logps(self) -> bool:
        # Samples scored within one optimizer step come from the current weights: ratio 1, old = logps.detach().
        return self.args.gradient_accumulation_steps % (self.args.steps_per_generation * self.args.num_iterations) != 0

    def _completion_hidden(self, model, batch, router_logits: bool = False):
        """``([B, C, H] hidden states predicting each completion token, MoE aux loss or None)``."""
        if "input_ids" in batch:  # joint mode precomputes them: rows of the union forward (joint_rollout.py)
            input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        else:
            input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
            attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        extra = {"output_router_logits": True} if router_logits else {}
        num_completion = batch["completion_ids"].shape[1]
        if batch.get("vision") is not None:  # a vision-language model's image fields, beside the ids
            extra.update(collate_vision(batch["vision"], input_ids.shape[1] - num_completion, num_completion,
                                        device=input_ids.device, dtype=self.accelerator.unwrap_model(model).dtype))
        # The final (normed) states are caught on the trunk (runtime/hidden.py): compiled blocks stay traceable.
        outputs, hidden_NTH = self._model_forward(model, {"input_ids": input_ids, "attention_mask": attention_mask},
                                                  **extra)
        hidden_BCH = hidden_NTH[:, -(num_completion + 1):-1]
        return hidden_BCH, getattr(outputs, "aux_loss", None) if router_logits else None

    @torch.no_grad()
    def _sampled_logps(self, model, batch: dict, batch_size: int) -> torch.Tensor:
        """``[B, C]`` fp32 log-probs of the completion tokens at the sampling temperature (0 on masked positions),
        computed ``batch_size`` rows at a time."""
        rows = batch["completion_ids"].shape[0]
        chunks = []
        with self.compute_loss_context_manager():
            for start in range(0, rows, batch_size):
                part = {key: batch[key][start:start + batch_size] for key in
                        ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "vision")
                        if batch.get(key) is not None}
                hidden_BCH, _ = self._completion_hidden(model, part)
                weight_VH, bias_V = self._lm_head(model)
                labels_BC = part["completion_ids"].masked_fill(part["completion_mask"] == 0, IGNORE_INDEX)
                with self.head_region(hidden_BCH.device):
                    chunks.append(linear_token_logprobs(hidden_BCH.to(weight_VH.dtype), weight_VH, labels_BC,
                                                        bias=bias_V, temperature=self.args.temperature,
                                                        softcap=self.head_softcap(model)))
        return torch.cat(chunks)

    def _generate_and_score(self, inputs: list[dict]) -> dict:
        args, mode, device = self.args, self._mode(), self.accelerator.device
        prompts = [row["prompt"] if self.agents is None else row.get("prompt", EMPTY_PROMPT) for row in inputs]
        images = row_images(inputs)

        def sample(prompts, prompt_tools=None):
            return generate_completions(
                self.model_wrapped, self._tokenizer, prompts, max_prompt_length=args.max_prompt_length,
                prompt_truncation=args.prompt_truncation, eos_token_ids=self.eos_token_ids,
                chat_template_kwargs=args.chat_template_kwargs, pad_to_multiple_of=args.pad_to_multiple_of,
                accelerator=self.accelerator, generation_config=self.generation_config,
                row_seeds=trainer_row_seeds(self, len(prompts)), share_prompt_prefill=self.prefix_sharing.enabled,
                prompt_tools=prompt_tools, processor=self.processing_class, images=images,
                continuous_batching_config=self.continuous_batching_config,
            )

        agent_round = None if self.agents is None else self.agents.run(
            self, inputs, prompts, sample, max_completion_length=args.max_completion_length,
            max_model_length=getattr(self.model.config.get_text_config(), "max_position_embeddings", None),
            pad_to_multiple_of=args.pad_to_multiple_of, generation_config=self.generation_config,
            eos_token_ids=self.eos_token_ids, async_loop=self.async_loop)
        rollout = sample(prompts) if agent_round is None else agent_round.rollout
        if agent_round is not None:  # TRL's trainer.environments: the latest round's instances, one per row
            self.environments = agent_round.environments
        completion_mask = rollout.completion_mask
        if args.mask_truncated_completions:
            completion_mask = completion_mask * (~rollout.is_truncated).long()[:, None]
        batch = {"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
                 "completion_ids": rollout.completion_ids, "completion_mask": completion_mask}
        if agent_round is not None and agent_round.tool_mask is not None:
            batch["tool_mask"] = agent_round.tool_mask
        if rollout.vision is not None:
            batch["vision"] = rollout.vision
        batch_size = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size
        if self._needs_old_logps():
            batch["old_per_token_logps"] = self._sampled_logps(self.model, batch, batch_size)
        if args.beta != 0.0:
            with self.reference_context() as reference:
                batch["ref_per_token_logps"] = self._sampled_logps(reference, batch, batch_size)
        batch["num_items_in_batch"] = self.accelerator.gather(loss_mask(batch).sum()).sum()

        columns = {key: [row[key] for row in inputs] for key in inputs[0]
                   if key not in ("prompt", "completion", "completion_ids")}
        extra_kwargs = self._reward_kwargs(len(prompts))
        if agent_round is not None:
            columns.update(row_extra_columns(agent_round.extra_columns, len(prompts)))
            if agent_round.environments is not None:
                extra_kwargs["environments"] = agent_round.environments
        scores = score_completions(
            self.rewards, prompts=rollout.prompts, completions=rollout.completions,
            completion_ids=rollout.completion_ids_list, columns=columns, on_error=args.reward_failure,
            extra_kwargs=extra_kwargs, device=device, async_loop=self.async_loop,
        )
        for name in scores.failures:
            self.record(mode, f"rewards/{name}/failures", 1.0)
        rewards_per_func = gather(scores.rewards_per_func)  # groups may span processes: normalise globally
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        advantages = self._advantages(rewards_per_func, batch, num_generations, mode)
        local = slice(self.accelerator.process_index * len(prompts), (self.accelerator.process_index + 1) *
                      len(prompts))
        batch["advantages"] = advantages[local]
        model_tokens = None if "tool_mask" not in batch else (rollout.completion_mask * batch["tool_mask"]).sum(1)
        self._record_rollout(mode, rollout, rewards_per_func, advantages, num_generations, model_tokens)
        if images is not None and args.log_multimodal:
            self._logs["images"].extend(gather_object(images))
        if self.agents is not None and self.agents.tools:
            self._record_tool_calls(mode, agent_round, len(prompts))
        return batch

    # --- loss ---------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError(f"return_outputs=True needs logits, which fusedrl's {type(self).__name__} never builds")
        args, mode = self.args, self._mode()
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        normaliser = None
        if args.loss_type in TOKEN_NORMALISED_LOSS_TYPES:
            # The round's completion tokens, per process and per accumulation window (TRL's normaliser).
            normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normaliser = normaliser * accumulation / args.steps_per_generation
        entropy_coef = self._entropy_coef_for_loss(mode, accumulation, self.accelerator.device)
        hidden_BCH, aux_loss = self._completion_hidden(model, inputs, router_logits=self.aux_loss_enabled)
        weight_VH, bias_V = self._lm_head(model)
        softcap = self.head_softcap(model)
        hidden_BCH = hidden_BCH.to(weight_VH.dtype)
        entropy_threshold = self._global_entropy_threshold(hidden_BCH, weight_VH, bias_V, inputs, softcap)
        with self.head_region(hidden_BCH.device):
            out = self.loss_region(_grpo_region)(
                hidden_BCH, weight_VH, bias_V, inputs["completion_ids"], loss_mask(inputs),
                inputs.get("old_per_token_logps"), inputs["advantages"], inputs.get("ref_per_token_logps"),
                normaliser, entropy_coef, args, softcap=softcap, entropy_threshold=entropy_threshold)
        loss = out.loss if args.loss_type in TOKEN_NORMALISED_LOSS_TYPES else out.loss / accumulation
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self.record(mode, "aux_loss", self.gathered_mean(aux_loss))
        self._record_loss_metrics(mode, inputs, out)
        self._record_entropy_bonus(mode, out, entropy_coef)
        return loss

    # --- logging ------------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # NaN entries (a reward function that returned None for a whole batch) must not poison a window's mean; a
        # metric with no valid value in the window is logged as None, as TRL does.
        mode = self._mode()
        for key, values in self._metrics[mode].items():
            values[:] = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
            if not values:
                logs[f"eval_{key}" if mode == "eval" else key] = None
        super().log(logs, start_time)
        if self.args.log_completions and self.accelerator.is_main_process and self._logs["prompt"]:
            print_completions(self._logs, self.state.global_step, self.args.num_completions_to_print,
                              self.args.log_unique_prompts)
