"""A GRPO run whose first half of every generation batch calls a tool, for the distributed worker
(tests/helpers/distributed.py, ``"tools": true`` in runs.json).

A tiny random model never writes tool-call syntax, so the policy's ``generate`` is wrapped: the real ``generate``
runs (under FSDP2 / ZeRO-3 its forwards are the collective ones under test), then the first-turn completions of the
rows in the first half of the global batch are replaced by a call of :func:`multiply`. Rows are counted globally
(process ``p`` of ``n`` with ``B`` rows holds rows ``p*B .. p*B+B-1``), so one process with the whole batch scripts the
same rows as two with half of it each: on two processes, process 0 calls the tool on every row and process 1 on none.
The continuations after the tool result are the model's own samples.

``max_completion_length`` (``generate``'s ``max_new_tokens``) must be at least the call's 75 tokens: a row the model
did not end (no EOS) is then already that wide, so right-padding the batch to the call's width never appends pad
tokens to an unended row (they would count as its completion, and only in the batches holding a call).
"""

from __future__ import annotations

import torch

# Character-level, like the presets' template: tools listed in a system turn, an assistant tool call as
# <tool_call>JSON</tool_call>, a tool message as a user turn "result: ...".
TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>tools:{% for t in tools %} "
    "{{ (t.function if t.function is defined else t).name }}{% endfor %}{{ eos_token }}{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}<|user|>result: {{ m.content }}{{ eos_token }}"
    "{% else %}{{ '<|' + m.role + '|>' }}{{ m.content or '' }}{% for c in m.tool_calls or [] %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CALL = '<tool_call>{"name": "multiply", "arguments": {"a": 3, "b": 4}}</tool_call><eos>'  # 75 tokens
# Prompt (<= 27 tokens), call (75), result turn (~14) and continuation reach past the tiny preset's 128 positions;
# its rotary embedding has no table to outgrow, so only the configured limit (the tool loop's max_model_length) is
# raised.
MAX_POSITIONS = 512


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


def trainer_kwargs(job) -> dict:
    """Make ``job`` (``cli.launch.build_job``'s) tool-ready; the extra GRPOTrainer arguments."""
    job.tokenizer.chat_template = TOOL_TEMPLATE
    job.model.config.max_position_embeddings = MAX_POSITIONS
    return {"tools": [multiply]}


def script_tool_calls(trainer) -> list[int]:
    """Wrap the policy's ``generate`` (module docstring); returns the list that counts its calls on this process."""
    model, tokenizer, accelerator = trainer.model, trainer.processing_class, trainer.accelerator
    original, calls = model.generate, []
    call_ids = tokenizer(CALL, add_special_tokens=False)["input_ids"]

    def generate(*args, input_ids, **kwargs):
        output = original(*args, input_ids=input_ids, **kwargs)
        calls.append(input_ids.shape[0])
        num_rows, width = input_ids.shape
        completions = [row.tolist() for row in output[:, width:]]
        for row, prompt in enumerate(input_ids):
            first_turn = "<tool_call>" not in tokenizer.decode(prompt)
            global_row = accelerator.process_index * num_rows + row
            if first_turn and global_row < num_rows * accelerator.num_processes // 2:
                completions[row] = call_ids
        longest = max(len(ids) for ids in completions)
        padded = [ids + [tokenizer.pad_token_id] * (longest - len(ids)) for ids in completions]
        return torch.cat([input_ids, torch.tensor(padded, dtype=output.dtype, device=output.device)], dim=1)

    model.generate = generate
    return calls


def generate_calls_per_process(trainer, calls: list[int]) -> list[int]:
    """How many times each process called ``generate`` (collective: every process calls it)."""
    count = torch.tensor([len(calls)], device=trainer.accelerator.device)
    return [int(n) for n in trainer.accelerator.gather(count).tolist()]
