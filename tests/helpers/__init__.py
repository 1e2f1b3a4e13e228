"""Helpers shared by more than one test module (STYLE.md rule 13a), one module per concern:

- ``models``: the one tiny-model factory (``tiny_llama_config`` / ``tiny_llama``);
- ``data``: the preference pairs of the preference trainers' parity tests;
- ``parity``: a fusedrl trainer and its TRL peer side by side, and the comparisons between them;
- ``runs``: small trainer runs used in more than one folder (PPO on the preset, the resume cases' DPO) and the toy
  rewards of the online trainer tests;
- ``online_resume``: the GRPO, RLOO, PPO and Online DPO runs that tests/trainers/test_online_resume.py kills and resumes;
- ``distributed``: the worker that runs several command-line trainer runs in one multi-process launch
  (tests/runtime/test_distributed_online.py);
- ``tool_turns``: the tool-calling chat template and tool of the GRPO agent tests, and the scripted tool calls of the
  distributed worker's tool run;
- ``vision``: the tiny vision-language models (one per family) and their image prompts.

Value comparison (``assert_close``) and the backend spies live in tests/utils.py, which imports only torch, so the
op tests do not import transformers or TRL. Fixtures live in the conftest.py files; no test module imports another.
"""
