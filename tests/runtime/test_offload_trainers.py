"""Activation offloading (fusedrl.runtime.offload) where trainers run it: the online trainers, compiled graphs, FSDP2.

- GRPO (gradient checkpointing on, a KL reference and two iterations per round, so old and reference log-probs run
  inside the offloaded step without grad) and PPO (policy and value model, checkpointing off) with
  ``activation_offloading=True`` log the same metrics and end with the same weights as without, bitwise, with the
  fused head and loss kept on the device (``paused``) and nothing left in the stash or tracker;
- compiled: GRPO with ``compile_blocks=True`` (each decoder layer one graph, whose saved activations AOTAutograd hands
  to the hooks): the same run with and without offloading, bitwise. (``compile=True`` compiles the fused loss region,
  which runs under ``paused``: none of its tensors reach the offloader, and its compile costs ~45 s here.)
- FSDP2: 2 gloo processes, the tiny Llama sharded per decoder layer. The loss and every local gradient shard are
  bitwise those without offloading, and exactly the activations of an unsharded copy of the model are offloaded (same
  count and bytes): the weights FSDP2 gathers before each layer's forward, into storage it allocates anew every
  time, stay where they are, recognised when saved (before, each linear layer's gathered ``weight.t()`` was copied);
- CPU: an offloader on the CPU says once per process that it saves no memory.

The offloaders here use ``min_bytes=0``: the tiny model's activations are a few KiB, below the 1 MiB default.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedrl.runtime import offload
from fusedrl.runtime.offload import ActivationOffloader
from tests.helpers.online import make_grpo_trainer, make_ppo_trainer, train_quietly

ROOT = Path(__file__).resolve().parents[2]
# Logged values that are not functions of the weights and data.
TIMING = {"step_time", "memory/peak_rss_mb", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


def _offloaded(trainer) -> ActivationOffloader:
    """Give ``trainer`` the offloader its first ``training_step`` would build, with every activation qualifying."""
    trainer._activation_offloader = ActivationOffloader(trainer.model, min_bytes=0)
    return trainer._activation_offloader


def _assert_same_run(plain, offloaded) -> None:
    plain_logs = [{k: v for k, v in e.items() if k not in TIMING} for e in plain.state.log_history]
    logs = [{k: v for k, v in e.items() if k not in TIMING} for e in offloaded.state.log_history]
    assert len(logs) == 3 and logs == plain_logs  # two steps and the summary, every metric bitwise
    for (name, param), ref in zip(offloaded.model.named_parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(param, ref), name
    stats = offloaded._activation_offloader.stats()
    assert stats.num_offloaded > 0 and stats.num_fetched > 0 and stats.skipped["paused"] > 0
    assert stats.stash_size == 0 and stats.tracker_size == 0


GRPO = {"beta": 0.1, "num_iterations": 2, "gradient_checkpointing": True}


def test_grpo_same_run_with_offloading(tmp_path):
    plain = make_grpo_trainer(tmp_path / "plain", **GRPO)
    train_quietly(plain)
    offloaded = make_grpo_trainer(tmp_path / "offloaded", **GRPO, activation_offloading=True)
    _offloaded(offloaded)
    train_quietly(offloaded)
    _assert_same_run(plain, offloaded)


def test_ppo_same_run_with_offloading(tmp_path):
    plain = make_ppo_trainer(tmp_path / "plain")
    train_quietly(plain)
    offloaded = make_ppo_trainer(tmp_path / "offloaded", activation_offloading=True)
    _offloaded(offloaded)
    train_quietly(offloaded)
    _assert_same_run(plain, offloaded)
    # The value model's activations go through the hooks too: it is part of the trained module.
    assert offloaded._activation_offloader.stats().num_offloaded > 2 * offloaded.model.policy.config.num_hidden_layers


def test_compiled_grpo_same_run_with_offloading(tmp_path):
    compiled = {"compile_blocks": True, "gradient_checkpointing": False}
    plain = make_grpo_trainer(tmp_path / "plain", **compiled)
    train_quietly(plain)
    offloaded = make_grpo_trainer(tmp_path / "offloaded", **compiled, activation_offloading=True)
    offloader = _offloaded(offloaded)
    train_quietly(offloaded)
    _assert_same_run(plain, offloaded)
    # The compiled layers save their weights as graph inputs: kept, recognised as parameters.
    assert offloader.stats().skipped["param"] > 0


# --- FSDP2 ----------------------------------------------------------------------------------------------------------


def _fsdp2_worker(output_dir: str) -> None:
    """Body of each torchrun process: see the module docstring. Writes ``rank-<r>.json``."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from fusedrl.cli.presets import load_preset_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = load_preset_model("tiny", seed=0).train()
    unsharded = copy.deepcopy(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(rank))

    def step(net, offloader):
        net.zero_grad(set_to_none=True)
        with offloader if offloader is not None else contextlib.nullcontext():
            loss = net(input_ids=ids, labels=ids).loss
            loss.backward()
        grads = {n: (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).clone()
                 for n, p in net.named_parameters()}
        return loss.detach(), grads

    loss, grads = step(model, None)
    sharded_offloader = ActivationOffloader(model, min_bytes=0)
    offloaded_loss, offloaded_grads = step(model, sharded_offloader)
    unsharded_offloader = ActivationOffloader(unsharded, min_bytes=0)
    step(unsharded, unsharded_offloader)
    sharded, reference = sharded_offloader.stats(), unsharded_offloader.stats()
    report = {"loss": torch.equal(loss, offloaded_loss),
              "grads": all(torch.equal(grads[n], offloaded_grads[n]) for n in grads),
              "offloaded": [sharded.num_offloaded, sharded.bytes_offloaded],
              "unsharded_offloaded": [reference.num_offloaded, reference.bytes_offloaded],
              "param_skips": sharded.skipped["param"]}
    Path(output_dir, f"rank-{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_gathered_weights_stay_on_device(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            str(Path(__file__).resolve()), "fsdp2", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-3000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert report["loss"] and report["grads"], f"rank {rank}: offloading changed the loss or a gradient shard"
        assert report["offloaded"] == report["unsharded_offloaded"], f"rank {rank}: gathered weights were offloaded"
        assert report["offloaded"][0] > 0
        # Each of the 2 layers' 7 linear layers, and the head, saves its gathered weight (transposed).
        assert report["param_skips"] >= 2 * 7 + 1


# --- CPU ------------------------------------------------------------------------------------------------------------


def test_cpu_offloading_says_once_that_it_saves_nothing(caplog, monkeypatch):
    monkeypatch.setattr(offload, "log_cpu_noop", functools.cache(offload.log_cpu_noop.__wrapped__))  # a fresh "once"
    with caplog.at_level(logging.WARNING, logger="fusedrl"):
        ActivationOffloader(device="cpu")
        ActivationOffloader(torch.nn.Linear(2, 2), device="cpu", min_bytes=0)
    messages = [r.getMessage() for r in caplog.records if "saves no memory" in r.getMessage()]
    assert len(messages) == 1 and "activation_offloading=False" in messages[0]


if __name__ == "__main__":
    if sys.argv[1] == "fsdp2":
        _fsdp2_worker(sys.argv[2])
