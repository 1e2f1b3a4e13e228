"""Rollouts for the online trainers (GRPO, RLOO, PPO, online DPO): prompts in, sampled completions out.

:func:`generate_completions` is the one entry point. It tokenizes the prompts (TRL's prompt-only formats: a string,
or a list of chat messages rendered with the chat template and the generation prompt), truncates or rejects long
prompts, left-pads them, samples with ``model.generate`` (KV cache on) and returns padded tensors, masks and the
decoded texts as a :class:`Rollout`.

Conventions (TRL 1.16's ``GRPOTrainer``):

- rows: with ``num_generations=G`` each prompt gives G consecutive rows, so rows ``g*G .. g*G+G-1`` are the
  completions of prompt ``g`` (the layout ``fusedrl.group_advantages`` expects). A trainer whose sampler already
  repeats prompts (GRPO's) passes ``num_generations=1``.
- prompt truncation: ``max_prompt_length=None`` (TRL 1.16's behaviour) keeps prompts whole. Otherwise a longer
  prompt keeps its LAST ``max_prompt_length`` tokens (TRL's ``truncation_side="left"``: the question and the
  generation prompt sit at the end), or with ``prompt_truncation="error"`` raises a ValueError naming the row.
- completion mask: 1 up to and including the first EOS (any id of ``eos_token_ids``), 0 after it; a completion with
  no EOS within ``max_completion_length`` is *truncated* (``is_truncated``) and fully masked in. The completion
  tensors are cut to the longest masked completion, so padding past every EOS costs nothing downstream.
- the model is generated from unwrapped (DDP/accelerate wrappers removed; a PEFT model generates through its
  adapters), in eval mode with gradient checkpointing switched off, so ``use_cache=True`` takes effect; both are
  restored afterwards. Under ZeRO-3 or FSDP2 every forward gathers the layers' shards, so the processes generate in
  step (``synced_gpus``: one whose rows all ended keeps joining the others' forwards until every row has ended).
- sampling draws from the global torch RNG, as TRL; ``row_seeds`` gives each row its own stream instead, so the
  samples do not depend on how rows are split across processes (``row_seeds.py``, ``rank_invariant_sampling``).

Legend: B rows (prompts x num_generations), P prompt positions (left-padded), C completion positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from transformers import GenerationConfig

from fusedrl.runtime.compile import eager_generation
from fusedrl.runtime.sharded_head import is_sharded
from fusedrl.runtime.shared_prefix.prefill import cache_keyword, shared_prompt_cache
from fusedrl.trainers.data.vision import (
    attach_images,
    check_vision_prompts,
    collate_vision,
    encode_vision_prompt,
    is_vision_processor,
    prompt_images,
)
from fusedrl.trainers.online.row_seeds import row_seeded_generation, rows_per_input_row

PROMPT_TRUNCATION_MODES = ("keep_end", "error")


class Rollout(NamedTuple):
    """One batch of sampled completions; tensors live on the model's device.

    prompt_ids / prompt_mask: ``[B, P]`` left-padded (pad id, mask 0 on padding).
    completion_ids / completion_mask: ``[B, C]`` right-padded with the pad id; the mask is 1 up to and including the
    first EOS. ``is_truncated`` ``[B]`` (bool): no EOS was sampled within ``max_completion_length``.
    prompts: the input prompts, each repeated ``num_generations`` times (strings or message lists).
    prompts_text: the rendered prompt strings (chat template applied), repeated likewise.
    completions: decoded completions in the prompts' format: a string, or ``[{"role": "assistant", "content": ...}]``
    for conversational prompts (what TRL passes to reward functions). completions_text: the plain strings.
    completion_ids_list: the masked-in ids of each completion (EOS included), as TRL passes ``completion_ids``.
    vision: with a vision processor, each row's image fields (``data.vision.VisionRow``, None for a row without
    images), which every forward over the rows takes beside the ids (``data.vision.collate_vision``).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    is_truncated: torch.Tensor
    prompts: list
    prompts_text: list[str]
    completions: list
    completions_text: list[str]
    completion_ids_list: list[list[int]]
    vision: list | None = None  # each row's processor fields (data/vision.py) for a vision-language model

    @property
    def input_ids(self) -> torch.Tensor:
        """``[B, P + C]`` prompt and completion, the layout a scoring forward takes."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


def is_conversational_prompt(prompt: Any) -> bool:
    """A prompt given as chat messages (a list of ``{"role", "content"}`` dicts) rather than a string."""
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]


def render_prompts(tokenizer, prompts: Sequence, chat_template_kwargs: dict | None = None) -> list[str]:
    """Prompt strings: conversational prompts through the chat template with the generation prompt appended (a
    vision processor's own template for image prompts)."""
    return [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {}))
        if is_conversational_prompt(p) else p
        for p in prompts
    ]


def _truncated(tokens: list[int], i: int, max_prompt_length: int | None, prompt_truncation: str,
               has_images: bool = False) -> list[int]:
    if max_prompt_length is None or len(tokens) <= max_prompt_length:
        return tokens
    if prompt_truncation == "error" or has_images:
        fix = ("set prompt_truncation='keep_end' to keep its last tokens" if not has_images else
               "a cut would drop image tokens that the image features fill")
        raise ValueError(f"prompt {i} has {len(tokens)} tokens, more than max_prompt_length={max_prompt_length}; "
                         f"raise max_prompt_length (None keeps prompts whole), shorten the prompt, or {fix}")
    return tokens[-max_prompt_length:]


def tokenize_vision_prompts(processor, prompts: Sequence, images: Sequence | None, *,
                            max_prompt_length: int | None = None, prompt_truncation: str = "keep_end",
                            chat_template_kwargs: dict | None = None, prompt_tools: Sequence[list | None] | None = None
                            ) -> tuple[list, list[list[int]], list]:
    """``(prompts with their images in them, token ids, VisionRow or None)`` per prompt, encoded by a vision
    processor (``data/vision.py``); ``images``: each prompt's images or None. A prompt with images longer than
    ``max_prompt_length`` is refused: cutting it would drop image tokens."""
    check_vision_prompts(prompts, images)
    prepared, ids, rows = [], [], []
    for i, prompt in enumerate(prompts):
        if not is_conversational_prompt(prompt):  # a text prompt of a vision-language model: the tokenizer's
            ids.append(_truncated(list(processor.tokenizer(prompt)["input_ids"]), i, max_prompt_length,
                                  prompt_truncation))
            prepared.append(prompt)
            rows.append(None)
            continue
        messages = attach_images(prompt, None if images is None else images[i])
        tools = (prompt_tools[i] or None) if prompt_tools is not None else None
        tokens, row = encode_vision_prompt(processor, messages, tools=tools, chat_template_kwargs=chat_template_kwargs)
        has_images = bool(prompt_images(messages))
        ids.append(_truncated(tokens, i, max_prompt_length, prompt_truncation, has_images))
        prepared.append(messages)
        rows.append(row if has_images or row["tokens"] else None)
    return prepared, ids, rows


def tokenize_prompts(tokenizer, prompts: Sequence, *, max_prompt_length: int | None = None,
                     prompt_truncation: str = "keep_end", chat_template_kwargs: dict | None = None,
                     prompt_tools: Sequence[list | None] | None = None) -> list[list[int]]:
    """Token ids of each prompt, as TRL tokenizes them: standard prompts with the tokenizer's special tokens (e.g. BOS),
    conversational ones via the chat template (which adds its own), with the row's tools from ``prompt_tools`` (one
    list or None per prompt) rendered in. Long prompts per the module docstring."""
    if prompt_truncation not in PROMPT_TRUNCATION_MODES:
        raise ValueError(f"prompt_truncation must be one of {PROMPT_TRUNCATION_MODES}, got {prompt_truncation!r}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1 or None, got {max_prompt_length}")
    if not prompts:
        raise ValueError("prompts is empty")
    ids = []
    for i, prompt in enumerate(prompts):
        if is_conversational_prompt(prompt):
            # `or None`: some templates (Llama 3) write their tool preamble for tools=[] too.
            tools = (prompt_tools[i] or None) if prompt_tools is not None else None
            tokens = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, tools=tools,
                                                   return_dict=True, **(chat_template_kwargs or {}))["input_ids"]
        elif isinstance(prompt, str):
            tokens = tokenizer(prompt)["input_ids"]
        else:
            raise ValueError(f"prompt {i} is a {type(prompt).__name__}; expected a string or a list of chat "
                             "messages ({'role': ..., 'content': ...})")
        ids.append(_truncated(list(tokens), i, max_prompt_length, prompt_truncation))
    return ids


def pad_sequences(sequences: Sequence[Sequence[int]], pad_value: int, *, side: str,
                  pad_to_multiple_of: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, L], mask [B, L])`` with every row padded on ``side`` ("left" or "right") to the longest row."""
    length = max(len(s) for s in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if not seq:
            continue
        span = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def completion_mask_after_eos(completion_ids_BC: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """``[B, C]`` long mask: 1 up to and including the first EOS of each row, 0 after it (all 1 without an EOS)."""
    is_eos_BC = torch.isin(completion_ids_BC, torch.as_tensor(list(eos_token_ids), device=completion_ids_BC.device))
    length = completion_ids_BC.shape[1]
    # Index of the first EOS, or C where there is none: argmax of a bool row returns the first True.
    first_eos_B = torch.where(is_eos_BC.any(1), is_eos_BC.int().argmax(1), torch.full_like(is_eos_BC[:, 0], length,
                                                                                             dtype=torch.long))
    positions_C = torch.arange(length, device=completion_ids_BC.device)
    return (positions_C[None, :] <= first_eos_B[:, None]).long()


def eos_token_ids_of(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and those of the model's generation config (TRL's rule)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids = [tokenizer.eos_token_id, *ids]
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation_config defines an EOS token; set "
                         "tokenizer.eos_token")
    return ids


@contextlib.contextmanager
def unwrapped_for_generation(model: torch.nn.Module, accelerator=None) -> Iterator[torch.nn.Module]:
    """The generation-ready model: unwrapped from DDP/accelerate, eval mode, gradient checkpointing off (so the KV
    cache is used); training mode and checkpointing flags are restored on exit."""
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    # Flip the per-layer flags rather than calling gradient_checkpointing_disable/enable: re-enabling would
    # rebuild the checkpoint function and drop the trainer's gradient_checkpointing_kwargs.
    checkpointed = [m for m in unwrapped.modules() if getattr(m, "gradient_checkpointing", False) is True]
    was_training = unwrapped.training
    for module in checkpointed:
        module.gradient_checkpointing = False
    unwrapped.eval()
    try:
        yield unwrapped
    finally:
        for module in checkpointed:
            module.gradient_checkpointing = True
        unwrapped.train(was_training)


def sampling_config(*, max_completion_length: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                    min_p: float | None = None, repetition_penalty: float = 1.0, do_sample: bool = True,
                    pad_token_id: int, bos_token_id: int | None, eos_token_ids: Sequence[int],
                    cache_implementation: str | None = None, generation_kwargs: dict | None = None
                    ) -> GenerationConfig:
    """TRL's generation settings as a ``GenerationConfig`` (``generation_kwargs`` override the named ones)."""
    if max_completion_length is None or max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (for greedy decoding pass do_sample=False)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    kwargs = {
        "max_new_tokens": max_completion_length, "do_sample": do_sample, "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id, "eos_token_id": list(eos_token_ids), "temperature": temperature,
        "top_p": top_p, "top_k": top_k, "min_p": min_p, "repetition_penalty": repetition_penalty,
        "cache_implementation": cache_implementation, "use_cache": True,
    }
    if not do_sample:  # greedy: sampling fields would only draw "not valid" warnings from generate
        kwargs.update(temperature=None, top_p=None, top_k=None, min_p=None)
    kwargs.update(generation_kwargs or {})
    return GenerationConfig(**kwargs, disable_compile=True)


def trainer_sampling_config(args, tokenizer, eos_token_ids: Sequence[int], max_completion_length: int
                            ) -> GenerationConfig:
    """:func:`sampling_config` from an online trainer's config (TRL's sampling field names, shared by GRPO, RLOO
    and online DPO), ``generation_kwargs`` on top; ``max_completion_length``: the config's length field."""
    return sampling_config(
        max_completion_length=max_completion_length, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_ids=eos_token_ids,
        cache_implementation=args.cache_implementation, generation_kwargs=args.generation_kwargs)


def _sample(model, prompt_ids, prompt_mask, generation_config, accelerator, *, row_seeds=None,
            share_prompt_prefill=False, vision=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``model.generate`` on left-padded prompts: ``(prompt_ids, prompt_mask, raw completion ids [B, C])`` on the
    model's device (the completions still hold whatever follows each row's EOS). ``vision``: each row's image fields
    (``Rollout.vision``)."""
    with unwrapped_for_generation(model, accelerator) as generator:
        device = next(generator.parameters()).device
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        image_inputs = {} if vision is None else collate_vision(vision, prompt_ids.shape[1], device=device,
                                                                dtype=generator.dtype)
        share_prompt_prefill = share_prompt_prefill and not image_inputs  # the shared prefill runs the text alone
        processors = None
        if row_seeds is not None:
            generation_config, processors = row_seeded_generation(generation_config, generator, row_seeds, device)
        # A sharded model's forwards are collective: a process whose rows all ended must keep stepping with the
        # others. transformers only knows this for ZeRO-3 and its own FSDP2 wrapping, not accelerate's.
        synced = (is_sharded(generator) and torch.distributed.is_available() and torch.distributed.is_initialized()
                  and torch.distributed.get_world_size() > 1)
        with eager_generation():  # compiled blocks (compile_blocks=True) would recompile every decoding step
            # A cache of its own (e.g. cache_implementation="static") or lock-step sharded decoding: plain prefill.
            own_cache = getattr(generation_config, "cache_implementation", None) not in (None, "dynamic")
            cache = (shared_prompt_cache(generator, prompt_ids, prompt_mask)
                     if share_prompt_prefill and not (synced or own_cache) else None)
            if cache is not None and (repeats := rows_per_input_row(generation_config, generator)) > 1:
                # Beam search decodes num_beams rows per prompt row: generate repeats the prompts, not our cache.
                cache.batch_repeat_interleave(repeats)
            output = generator.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                        generation_config=generation_config, logits_processor=processors,
                                        synced_gpus=True if synced else None, **image_inputs,
                                        **({cache_keyword(generator): cache} if cache is not None else {}))
    return prompt_ids, prompt_mask, output[:, prompt_ids.shape[1]:]


def _sample_continuous(model, prompt_ids_list: Sequence[Sequence[int]], generation_config, accelerator,
                       continuous_batching_config, pad_token_id: int) -> torch.Tensor:
    """Raw completion ids ``[B, C]`` (right-padded with the pad id) from transformers' continuous-batching engine
    (``model.generate_batch``: paged KV cache, no padding of the prompts), TRL's
    ``use_transformers_continuous_batching`` path. Samples from the global torch RNG."""
    with unwrapped_for_generation(model, accelerator) as generator, eager_generation():
        outputs = generator.generate_batch([list(ids) for ids in prompt_ids_list], generation_config=generation_config,
                                           continuous_batching_config=continuous_batching_config, progress_bar=False)
        device = next(generator.parameters()).device
    # Request ids are "req_<input index>"; the dict is in finishing order, so rows are put back in input order.
    order = sorted(outputs, key=lambda key: int(key.rsplit("_", 1)[-1]) if key.rsplit("_", 1)[-1].isdigit() else 0)
    completions = [list(outputs[key].generated_tokens) or [pad_token_id] for key in order]
    if len(completions) != len(prompt_ids_list):
        raise RuntimeError(f"generate_batch returned {len(completions)} completions for {len(prompt_ids_list)} prompts")
    completion_ids, _ = pad_sequences(completions, pad_token_id, side="right")
    return completion_ids.to(device)


def _right_padded(values: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(values, (0, length - len(values)))


@torch.no_grad()
def sample_continuations(model: torch.nn.Module, tokenizer, sequences: Sequence[Sequence[int]], *,
                         generation_config: GenerationConfig, eos_token_ids: Sequence[int], accelerator=None,
                         vision: Sequence | None = None) -> list[list[int]]:
    """One sampled continuation of each token sequence (a conversation so far: prompt, completion, tool results),
    cut after its first EOS; the multi-turn tool loop's later turns. Uses the global torch RNG. ``vision``: each
    sequence's image fields (``Rollout.vision``: the prompt's and any a tool returned), its per-token fields
    (prompt's, then completion's) extended with zeros to the sequence's length."""
    prompt_ids, prompt_mask = pad_sequences(sequences, tokenizer.pad_token_id, side="left")
    if vision is not None:
        vision = [None if row is None else {"images": row["images"], "tokens": {
            key: _right_padded(torch.cat([value, row.get("completion_tokens", {}).get(key, value[:0])]), len(sequence))
            for key, value in row["tokens"].items()}} for row, sequence in zip(vision, sequences, strict=True)]
    _, _, completion_ids = _sample(model, prompt_ids, prompt_mask, generation_config, accelerator, vision=vision)
    mask = completion_mask_after_eos(completion_ids, eos_token_ids).bool().cpu()
    return [row[keep].tolist() for row, keep in zip(completion_ids.cpu(), mask, strict=True)]


@torch.no_grad()
def generate_completions(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence,
    *,
    num_generations: int = 1,
    max_prompt_length: int | None = None,
    prompt_truncation: str = "keep_end",
    max_completion_length: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    do_sample: bool = True,
    eos_token_ids: Sequence[int] | None = None,
    generation_kwargs: dict | None = None,
    chat_template_kwargs: dict | None = None,
    pad_to_multiple_of: int | None = None,
    accelerator=None,
    generation_config: GenerationConfig | None = None,
    row_seeds: Sequence[int] | None = None,
    share_prompt_prefill: bool = False,
    prompt_tools: Sequence[list | None] | None = None,
    processor=None,
    images: Sequence[list | None] | None = None,
    continuous_batching_config=None,
) -> Rollout:
    """Sample ``num_generations`` completions of each prompt with ``model.generate`` (KV cache on).

    model: a causal LM (or its accelerate/DDP wrapper when ``accelerator`` is given; PEFT models work as they are).
    tokenizer: the policy's tokenizer (a processor's ``.tokenizer``); its pad token must be set.
    prompts: strings or chat-message lists (not mixed). Sampling: ``temperature``, ``top_p``, ``top_k`` (0 = off),
    ``min_p``, ``repetition_penalty``; ``generation_kwargs`` override them (``GenerationConfig`` fields);
    ``generation_config`` replaces them all. ``eos_token_ids`` default to :func:`eos_token_ids_of`.
    Prompt truncation (``max_prompt_length``, ``prompt_truncation``) and masks: see the module docstring.
    Uses the global torch RNG: ``torch.manual_seed`` before the call reproduces the samples. ``row_seeds`` (one per
    row, prompts x num_generations) gives each row its own random stream instead, so its completion does not depend
    on the other rows of the batch (``row_seeds.py``). ``share_prompt_prefill``: a prompt repeated in the batch (a
    GRPO group) is prefilled once and its KV cache copied to its rows (``runtime/shared_prefix/prefill.py``).
    ``prompt_tools``: the tools rendered into each row's prompt (rows = prompts x num_generations; agents/).
    ``processor``: a vision-language model's processor (``data/vision.py``), which then encodes conversational
    prompts with ``images`` (each prompt's list of images, or None) in them; ``Rollout.vision`` holds the rows' fields.
    ``continuous_batching_config`` (a ``transformers.generation.ContinuousBatchingConfig``): sample with
    ``model.generate_batch`` instead of ``generate`` (text prompts; no ``row_seeds``, no sharded model).
    """
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the EOS token)")
    if len({is_conversational_prompt(p) for p in prompts}) > 1:
        raise ValueError("prompts mix strings and chat-message lists; use one format per batch")
    prompts = [p for p in prompts for _ in range(num_generations)]
    if row_seeds is not None and len(row_seeds) != len(prompts):
        raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {len(prompts)} rows (prompts x num_generations)")
    vision = None
    if processor is not None and is_vision_processor(processor):
        images = None if images is None else [i for i in images for _ in range(num_generations)]
        prompts, prompt_ids_list, vision = tokenize_vision_prompts(
            processor, prompts, images, max_prompt_length=max_prompt_length, prompt_truncation=prompt_truncation,
            chat_template_kwargs=chat_template_kwargs, prompt_tools=prompt_tools)
        if all(row is None for row in vision):
            vision = None
    elif images is not None:
        raise ValueError("the rows carry images but processing_class is a tokenizer; pass the vision-language "
                         "model's processor (AutoProcessor.from_pretrained(model_id)) as processing_class")
    else:
        prompt_ids_list = tokenize_prompts(tokenizer, prompts, max_prompt_length=max_prompt_length,
                                           prompt_truncation=prompt_truncation,
                                           chat_template_kwargs=chat_template_kwargs, prompt_tools=prompt_tools)
    if eos_token_ids is None:
        eos_token_ids = eos_token_ids_of(accelerator.unwrap_model(model) if accelerator is not None else model,
                                         tokenizer)
    if generation_config is None:
        generation_config = sampling_config(
            max_completion_length=max_completion_length, temperature=temperature, top_p=top_p, top_k=top_k,
            min_p=min_p, repetition_penalty=repetition_penalty, do_sample=do_sample,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_ids=eos_token_ids,
            generation_kwargs=generation_kwargs,
        )
    prompt_ids, prompt_mask = pad_sequences(prompt_ids_list, tokenizer.pad_token_id, side="left",
                                            pad_to_multiple_of=pad_to_multiple_of)
    if continuous_batching_config is not None:
        if vision is not None or row_seeds is not None:
            raise ValueError("continuous batching (use_transformers_continuous_batching) samples text prompts from "
                             "the global RNG: it takes neither images nor per-row seeds (rank_invariant_sampling); "
                             "turn one of them off")
        completion_ids = _sample_continuous(model, prompt_ids_list, generation_config, accelerator,
                                            continuous_batching_config, tokenizer.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(completion_ids.device), prompt_mask.to(completion_ids.device)
    else:
        prompt_ids, prompt_mask, completion_ids = _sample(model, prompt_ids, prompt_mask, generation_config,
                                                          accelerator, row_seeds=row_seeds,
                                                          share_prompt_prefill=share_prompt_prefill, vision=vision)
    device = prompt_ids.device
    completion_mask = completion_mask_after_eos(completion_ids, eos_token_ids)
    lengths = completion_mask.sum(1)
    is_truncated = ~torch.isin(completion_ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1),
                               torch.as_tensor(list(eos_token_ids), device=device)) | (lengths == 0)
    # Cut to the longest kept completion and pad what follows an EOS with the pad id (generate pads finished rows
    # already; this also covers an eos id that is not generation_config's first).
    width = int(lengths.max().item()) if lengths.numel() else 0
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    completion_ids = completion_ids[:, :width]
    completion_mask = completion_mask[:, :width]
    if completion_ids.shape[1] < width:  # pad_to_multiple_of beyond what was generated
        extra = width - completion_ids.shape[1]
        completion_ids = torch.nn.functional.pad(completion_ids, (0, extra), value=tokenizer.pad_token_id)
        completion_mask = torch.nn.functional.pad(completion_mask, (0, extra), value=0)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    completion_ids_list = [row[mask.bool()].tolist() for row, mask in zip(completion_ids.cpu(), completion_mask.cpu(),
                                                                           strict=True)]
    completions_text = tokenizer.batch_decode(completion_ids_list, skip_special_tokens=True)
    conversational = is_conversational_prompt(prompts[0])
    completions = ([[{"role": "assistant", "content": text}] for text in completions_text] if conversational
                   else list(completions_text))
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, is_truncated=is_truncated, prompts=prompts,
        prompts_text=render_prompts(processor if vision is not None else tokenizer, prompts, chat_template_kwargs),
        completions=completions, completions_text=completions_text, completion_ids_list=completion_ids_list,
        vision=vision,
    )


def _content_text(content) -> str:
    """A message's text: its string, or its text blocks (a tool's image result shows as ``<image>``)."""
    if isinstance(content, list):
        return "".join(block.get("text", "") if block.get("type") == "text" else f"<{block.get('type')}>"
                       for block in content if isinstance(block, dict))
    return str(content or "")


def rollout_from_ids(tokenizer, prompts: Sequence, prompt_ids_list: Sequence[Sequence[int]],
                     completion_ids_list: Sequence[Sequence[int]], completions: list, *,
                     eos_token_ids: Sequence[int], pad_to_multiple_of: int | None = None, device=None,
                     chat_template_kwargs: dict | None = None, vision: list | None = None,
                     processor=None) -> Rollout:
    """A :class:`Rollout` from per-row token lists that did not come out of one ``generate`` call (a multi-turn tool
    conversation, a user's ``rollout_func``): every listed completion token is masked in, and a row is truncated
    when its last token is neither an EOS nor the pad id (TRL's rule; an empty completion counts as truncated).
    ``vision`` / ``processor``: a vision-language round's per-row prompt image fields and the processor that renders
    its prompts."""
    if len(prompt_ids_list) != len(completion_ids_list):
        raise ValueError(f"{len(prompt_ids_list)} prompt_ids rows but {len(completion_ids_list)} completion_ids rows")
    prompt_ids, prompt_mask = pad_sequences(prompt_ids_list, tokenizer.pad_token_id, side="left",
                                            pad_to_multiple_of=pad_to_multiple_of)
    completion_ids, completion_mask = pad_sequences([list(ids) or [tokenizer.pad_token_id] for ids in
                                                     completion_ids_list], tokenizer.pad_token_id, side="right",
                                                    pad_to_multiple_of=pad_to_multiple_of)
    for row, ids in enumerate(completion_ids_list):
        if not ids:  # the placeholder pad token of an empty completion is not a completion token
            completion_mask[row] = 0
    ends = {*eos_token_ids, tokenizer.pad_token_id}
    is_truncated = torch.tensor([not ids or ids[-1] not in ends for ids in completion_ids_list])
    prompts_text = render_prompts(processor if vision is not None else tokenizer, prompts, chat_template_kwargs)
    completions_text = [c if isinstance(c, str) else "".join(_content_text(m.get("content")) for m in c)
                        for c in completions]
    return Rollout(
        prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device), completion_ids=completion_ids.to(device),
        completion_mask=completion_mask.to(device), is_truncated=is_truncated.to(device), prompts=list(prompts),
        prompts_text=prompts_text, completions=completions, completions_text=completions_text,
        completion_ids_list=[list(ids) for ids in completion_ids_list], vision=vision,
    )
