"""Model tags as TRL 1.16 adds them (``model.add_model_tags(trainer._tag_names)``, read by the model card and by
TRL's own tests): ``["trl", <method>]`` plus ``"fusedrl"``, also through a PEFT wrapper."""

from __future__ import annotations

import pytest
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM

import fusedrl
from fusedrl.cli.presets import build_tokenizer
from fusedrl.trainers.models import trainer_tags
from tests.helpers.data import CHOSEN, LORA, PROMPTS, REJECTED, standard_pairs

TRL_METHODS = {"DPO": "dpo", "KTO": "kto", "ORPO": "orpo", "CPO": "cpo", "GRPO": "grpo", "RLOO": "rloo", "PPO": "ppo",
               "OnlineDPO": "online-dpo"}


@pytest.mark.parametrize(("method", "tag"), TRL_METHODS.items())
def test_every_trainer_has_trl_tag_names(method, tag):
    assert trainer_tags(getattr(fusedrl, f"{method}Trainer")) == ["trl", tag, "fusedrl"]


def test_a_subclass_keeps_its_parents_tags():
    class MyDPO(fusedrl.DPOTrainer):
        pass

    assert trainer_tags(MyDPO) == ["trl", "dpo", "fusedrl"]


def _dataset(method: str) -> Dataset:
    if method == "KTO":
        return Dataset.from_dict({"prompt": PROMPTS * 2, "completion": CHOSEN + REJECTED,
                                  "label": [True] * 8 + [False] * 8})
    return standard_pairs()


@pytest.mark.parametrize(("method", "peft"), [("DPO", False), ("DPO", True), ("KTO", False), ("ORPO", False),
                                               ("CPO", True)])
def test_the_model_carries_the_tags(method, peft, model_dir, tmp_path):
    args = getattr(fusedrl, f"{method}Config")(str(tmp_path), report_to=[], bf16=False, use_cpu=True)
    trainer = getattr(fusedrl, f"{method}Trainer")(
        AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=_dataset(method),
        processing_class=build_tokenizer(), peft_config=LoraConfig(**LORA) if peft else None)
    assert trainer.model.model_tags == trainer._tag_names == ["trl", TRL_METHODS[method], "fusedrl"]
