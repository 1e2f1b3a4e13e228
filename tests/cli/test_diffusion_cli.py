"""``fusedrl ddpo`` / ``fusedrl alignprop``: one epoch on the tiny pipeline from flags and a YAML config, the trained
weights saved and loadable, the logged history written; and the clear errors for a bad pipeline, JSON or field."""

from __future__ import annotations

import json

import pytest
import yaml

pytest.importorskip("diffusers")

from fusedrl.cli.main import main as fusedrl_main
from fusedrl.trainers.diffusion.pipeline import LORA_WEIGHTS

# The smallest runs that train: 2 images of 3 DDIM steps, one optimizer step per epoch (AlignProp samples
# train_batch_size images per step and has no sample_batch_size).
TINY = {"sample_num_steps": 3, "train_batch_size": 2, "num_epochs": 1, "log_image_freq": 1}
DDPO_TINY = {**TINY, "sample_batch_size": 2, "sample_num_batches_per_epoch": 1}


def _run(command: str, tmp_path, *extra: str) -> int:
    config = tmp_path / "config.yaml"
    fields = dict(DDPO_TINY if command == "ddpo" else TINY)
    if command == "alignprop":
        fields["truncated_rand_backprop_minmax"] = [0, 3]
        fields["truncated_backprop_timestep"] = 2
    config.write_text(yaml.safe_dump(fields))
    return fusedrl_main([command, "--pipeline", "tiny", "--reward", "brightness", "--config", str(config),
                     "--output_dir", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize("command", ["ddpo", "alignprop"])
def test_trains_saves_and_logs(command, tmp_path):
    assert _run(command, tmp_path, "--train_learning_rate", "1e-3") == 0
    out = tmp_path / "out"
    assert (out / "final" / LORA_WEIGHTS).is_file()
    history = json.loads((out / "log_history.json").read_text())
    assert history and all("epoch" in entry for entry in history)
    assert any("reward_mean" in entry or "reward" in entry for entry in history), history
    assert sorted(p.name for p in (out / "images").iterdir()), "no image grid written"


def test_flag_overrides_yaml(tmp_path, monkeypatch):
    """The flag wins over the YAML file: the trainer sees the flag's learning rate."""
    from fusedrl.trainers.diffusion import ddpo

    seen = {}
    original = ddpo.DDPOTrainer.__init__

    def spy(self, config, *args, **kwargs):
        seen["lr"] = config.train_learning_rate
        original(self, config, *args, **kwargs)

    monkeypatch.setattr(ddpo.DDPOTrainer, "__init__", spy)
    (tmp_path / "lr.yaml").write_text(yaml.safe_dump({**DDPO_TINY, "train_learning_rate": 1e-2}))
    assert fusedrl_main(["ddpo", "--pipeline", "tiny", "--reward", "brightness", "--config", str(tmp_path / "lr.yaml"),
                     "--train_learning_rate", "2e-3", "--output_dir", str(tmp_path / "out")]) == 0
    assert seen["lr"] == 2e-3


@pytest.mark.parametrize(("args", "message"), [
    (["--pipeline", "no/such/dir", "--reward", "brightness"], "no model_index.json"),
    (["--pipeline", "tiny", "--reward", "brightness", "--reward_kwargs", "{bad"], "--reward_kwargs: not valid JSON"),
    (["--pipeline", "tiny", "--reward", "brightness", "--prompt_kwargs", "[1]"], "expected a JSON object"),
    (["--pipeline", "tiny", "--reward", "brightness", "--sample_eta", "-1"], "sample_eta"),
], ids=["pipeline", "reward-json", "prompt-json", "field"])
def test_bad_input_names_the_flag(args, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        fusedrl_main(["ddpo", *args, "--output_dir", str(tmp_path / "out")])


def test_unknown_reward_lists_the_registered_ones(tmp_path):
    with pytest.raises(ValueError, match="brightness"):
        fusedrl_main(["ddpo", "--pipeline", "tiny", "--reward", "no_such_reward", "--output_dir", str(tmp_path)])
