"""Offline stand-ins of the ``trl-internal-testing`` tiny models that TRL's trainer tests load by hub id.

Each stand-in is built from a config (same architecture class as the hub model, hidden size 16, two layers, the
stand-in tokenizer's vocabulary: ``trl_suite.tokenizer`` says why two sizes), randomly initialised from a fixed seed, saved in bfloat16 as the hub
models are, and written into a Hugging Face hub-cache layout (``models--<org>--<name>/snapshots/<rev>/`` plus
``refs/main``). With ``HF_HUB_CACHE`` pointing there and ``HF_HUB_OFFLINE=1``, every ``from_pretrained(<hub id>)``,
in the tests and inside either library, resolves to the stand-in without code changes.

Vision-language models (``*ForConditionalGeneration`` with an image processor) are built by ``trl_suite.vision``:
the same toy text model behind a toy vision tower, with a processor (image processor, this tokenizer plus the
family's image tokens, a chat template) saved beside it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import GenerationConfig

from trl_suite.tokenizer import SMALL_VOCAB, build_tokenizer
from trl_suite.vision import VISION_STANDINS, build_vision

ORG = "trl-internal-testing"
REVISION = "0" * 40  # the snapshot folder name: any 40-hex string works as a commit hash

logger = logging.getLogger("trl_suite")

# Every decoder stand-in: hidden 16 = 4 heads x head_dim 4 (2 KV heads), 2 layers, MLP width 32.
_DECODER = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 4, "max_position_embeddings": 2048}
_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 16}

# hub name -> (config class, model class, config fields on top of _DECODER). Sequence classifiers get num_labels=1.
STANDINS: dict[str, tuple[str, str, dict]] = {
    "tiny-Qwen2ForCausalLM-2.5": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "small-Qwen2ForCausalLM-2.5": ("Qwen2Config", "Qwen2ForCausalLM",
                                   {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16}),
    "tiny-Qwen2ForSequenceClassification-2.5": ("Qwen2Config", "Qwen2ForSequenceClassification", {}),
    "tiny-Qwen3ForCausalLM": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "tiny-Qwen3ForSequenceClassification": ("Qwen3Config", "Qwen3ForSequenceClassification", {}),
    "tiny-Qwen3MoeForCausalLM": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": 4, **_MOE}),
    "tiny-Qwen3MoeForSequenceClassification": ("Qwen3MoeConfig", "Qwen3MoeForSequenceClassification",
                                               {"num_experts": 4, **_MOE}),
    "tiny-LlamaForCausalLM-3.2": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "tiny-LlamaForSequenceClassification-3.2": ("LlamaConfig", "LlamaForSequenceClassification", {}),
    "tiny-MistralForCausalLM-0.2": ("MistralConfig", "MistralForCausalLM", {}),
    "tiny-Gemma2ForCausalLM": ("Gemma2Config", "Gemma2ForCausalLM", {"sliding_window": 64}),
    "tiny-Cohere2ForCausalLM": ("Cohere2Config", "Cohere2ForCausalLM", {"sliding_window": 64}),
    "tiny-Glm4MoeForCausalLM": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                                {"n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1,
                                 "n_group": 1, "topk_group": 1, **_MOE}),
    "tiny-GptOssForCausalLM": ("GptOssConfig", "GptOssForCausalLM",
                               {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 64,
                                "layer_types": ["sliding_attention", "full_attention"]}),
    "tiny-NemotronHForCausalLM-nano": ("NemotronHConfig", "NemotronHForCausalLM",
                                       {"layers_block_type": ["mamba", "attention", "moe"], "mamba_num_heads": 4, "mamba_head_dim": 8, "ssm_state_size": 8, "n_groups": 1,
                                        "chunk_size": 16, "n_routed_experts": 4, "moe_shared_expert_intermediate_size":
                                        16, **_MOE}),
    "tiny-Olmo3ForCausalLM": ("Olmo3Config", "Olmo3ForCausalLM", {"sliding_window": 64}),
    "tiny-Lfm2ForCausalLM": ("Lfm2Config", "Lfm2ForCausalLM", {"layer_types": ["conv", "full_attention"]}),
    # Encoder-decoder (ORPO/CPO's T5 tests): T5Config maps hidden_size / heads / layers onto d_model / num_heads /
    # num_layers; d_kv and d_ff are its own names for head_dim and the MLP width.
    "tiny-T5ForConditionalGeneration": ("T5Config", "T5ForConditionalGeneration",
                                        {"d_kv": 4, "d_ff": 32, "relative_attention_num_buckets": 8}),
}
# trust_remote_code: a Llama under its own model_type, loadable only through the code files saved beside it.
REMOTE = "tiny-RemoteForCausalLM"

_REMOTE_CONFIGURATION = '''"""A Llama configuration under its own model_type (trl_suite's trust_remote_code stand-in)."""
from transformers import LlamaConfig


class RemoteConfig(LlamaConfig):
    model_type = "remote"
'''
_REMOTE_MODELING = '''"""Llama classes bound to RemoteConfig (trl_suite's trust_remote_code stand-in)."""
from transformers import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel

from .configuration_remote import RemoteConfig


class RemoteModel(LlamaModel):
    config_class = RemoteConfig


class RemoteForCausalLM(LlamaForCausalLM):
    config_class = RemoteConfig


class RemoteForSequenceClassification(LlamaForSequenceClassification):
    config_class = RemoteConfig
'''


def snapshot_dir(hub_cache: Path, repo_id: str, kind: str = "models") -> Path:
    """The snapshot folder of ``repo_id`` in a hub cache, with ``refs/main`` pointing at it."""
    repo_dir = hub_cache / f"{kind}--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(REVISION)
    path = repo_dir / "snapshots" / REVISION
    path.mkdir(parents=True, exist_ok=True)
    return path


def _config_fields(tokenizer, extra: dict) -> dict:
    return {**_DECODER, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id, **extra}


def _generation_config(tokenizer) -> GenerationConfig:
    # Qwen's: both <|im_end|> and <|endoftext|> end a completion (TRL reads every EOS of the generation config).
    return GenerationConfig(eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=None)


def _save(model, tokenizer, path: Path) -> None:
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    if hasattr(model, "generation_config") and not model.config.architectures[0].endswith("Classification"):
        _generation_config(tokenizer).save_pretrained(path)


def _build(name: str, tokenizer, path: Path, seed: int) -> None:
    config_cls, model_cls, extra = STANDINS[name]
    fields = _config_fields(tokenizer, extra)
    if model_cls.endswith("SequenceClassification"):
        fields["num_labels"] = 1
    if config_cls == "T5Config":  # T5 starts the decoder with its pad token
        fields["decoder_start_token_id"] = tokenizer.pad_token_id
    config = getattr(transformers, config_cls)(**fields)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():  # a forward proves the config is consistent before anything depends on it
        model(input_ids=ids, **({"decoder_input_ids": ids} if config.is_encoder_decoder else {}))
    _save(model, tokenizer, path)


def _build_remote(tokenizer, path: Path, seed: int) -> None:
    (path / "configuration_remote.py").write_text(_REMOTE_CONFIGURATION)
    (path / "modeling_remote.py").write_text(_REMOTE_MODELING)
    config = transformers.LlamaConfig(**_config_fields(tokenizer, {}))
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    _save(model, tokenizer, path)
    # Rewrite the saved config as the remote architecture: model_type "remote", classes found through auto_map.
    config_file = path / "config.json"
    saved = json.loads(config_file.read_text())
    saved.update(model_type="remote", architectures=["RemoteForCausalLM"], auto_map={
        "AutoConfig": "configuration_remote.RemoteConfig", "AutoModel": "modeling_remote.RemoteModel",
        "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
        "AutoModelForSequenceClassification": "modeling_remote.RemoteForSequenceClassification"})
    config_file.write_text(json.dumps(saved, indent=2))


def build_models(hub_cache: Path, names: list[str] | None = None, seed: int = 0,
                 vocab_size: int = SMALL_VOCAB, vocab: str | None = None) -> dict[str, str]:
    """Build every stand-in (or ``names``) into ``hub_cache``; ``{hub id: "ok" | reason it was skipped}``.

    A stand-in whose snapshot already holds a ``config.json`` is kept (building all takes ~10 s).
    """
    tokenizer = build_tokenizer(vocab_size, vocab)
    builders: dict[str, Callable[[Path], None]] = {name: (lambda p, n=name: _build(n, tokenizer, p, seed))
                                                   for name in STANDINS}
    builders[REMOTE] = lambda p: _build_remote(tokenizer, p, seed)
    builders.update({name: (lambda p, n=name: build_vision(n, p, seed, vocab_size, vocab)) for name in VISION_STANDINS})
    status = {}
    for name, build in builders.items():
        if names is not None and name not in names:
            continue
        path = snapshot_dir(hub_cache, f"{ORG}/{name}")
        if (path / "config.json").exists():
            status[f"{ORG}/{name}"] = "ok"
            continue
        try:
            build(path)
            status[f"{ORG}/{name}"] = "ok"
        except Exception as error:  # noqa: BLE001 - an architecture this transformers cannot build is reported
            shutil.rmtree(path.parent.parent, ignore_errors=True)
            status[f"{ORG}/{name}"] = f"{type(error).__name__}: {error}"
            logger.warning("no stand-in for %s: %s", name, error)
    return status
