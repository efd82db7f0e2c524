"""The shape of a Llama-style decoder: presets from published config.json files, or read from one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kernel.errors import GuardtuneError
from kernel.models import PACKAGED, resolve_base_model

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-style decoder that memory depends on."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer in one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_params(self) -> int:
        bias = (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return sum(a * b for a, b in self.linears().values()) + bias

    def layer_params(self) -> int:
        return self.layer_linear_params() + 2 * self.hidden_size  # two RMSNorm weights

    def embedding_params(self) -> int:
        """Input embeddings plus an untied output head."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    def total_params(self) -> int:
        return self.embedding_params() + self.num_layers * self.layer_params() + self.hidden_size


# Shapes from the published config.json files (Hugging Face model repositories), so 7B and 70B
# can be estimated without their weights. Qwen-7B's config writes intermediate_size 22016 for its
# fused w1|w2 pair; each SwiGLU branch is 11008 wide, which is what this shape holds.
PRESETS: dict[str, ModelShape] = {
    "smollm2-135m": ModelShape("SmolLM2-135M", 576, 30, 9, 3, 64, 1536, 49152, True),
    "llama-2-7b": ModelShape("Llama-2-7B", 4096, 32, 32, 32, 128, 11008, 32000, False),
    "llama-2-13b": ModelShape("Llama-2-13B", 5120, 40, 40, 40, 128, 13824, 32000, False),
    "llama-65b": ModelShape("LLaMA-65B", 8192, 80, 64, 64, 128, 22016, 32000, False),
    "llama-2-70b": ModelShape("Llama-2-70B", 8192, 80, 64, 8, 128, 28672, 32000, False),
    "qwen-7b": ModelShape("Qwen-7B", 4096, 32, 32, 32, 128, 11008, 151936, False, qkv_bias=True),
}
PRESETS["smollm2-135m-instruct"] = PRESETS["smollm2-135m"]


def shape_from_config(raw: dict, name: str) -> ModelShape:
    """A ModelShape from a transformers config.json dict (Llama, Qwen, Qwen2, Mistral naming)."""
    def need(*keys):
        for k in keys:
            if raw.get(k) is not None:
                return raw[k]
        raise GuardtuneError(f"{name}: config.json has no {keys[0]}")

    h = int(need("hidden_size", "n_embd", "d_model"))
    heads = int(need("num_attention_heads", "n_head"))
    inter = int(need("intermediate_size", "ffn_dim", "n_inner"))
    qwen1 = raw.get("model_type") == "qwen"
    return ModelShape(
        name=name,
        hidden_size=h,
        num_layers=int(need("num_hidden_layers", "n_layer", "num_layers")),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or raw.get("kv_channels") or h // heads),
        intermediate_size=inter // 2 if qwen1 else inter,
        vocab_size=int(need("vocab_size", "padded_vocab_size")),
        tie_embeddings=bool(raw.get("tie_word_embeddings", True)),  # transformers' default is tied
        qkv_bias=bool(raw.get("attention_bias", qwen1 or raw.get("model_type") == "qwen2")),
    )


def resolve_shape(model: str, model_config: Path | None = None) -> ModelShape:
    """--model-config, a preset name, a config.json or a directory holding one, or a base-model alias."""
    if model_config is not None:
        return _read_config_json(Path(model_config))
    if model.lower() in PRESETS:
        return PRESETS[model.lower()]
    path = Path(model).expanduser()
    if path.is_file():
        return _read_config_json(path)
    if (path / "config.json").is_file():
        return _read_config_json(path / "config.json")
    if model in PACKAGED:
        return _read_config_json(resolve_base_model(model, log=lambda m: None) / "config.json")
    raise GuardtuneError(f"model '{model}': not a preset ({', '.join(sorted(PRESETS))}), a config.json or a "
                         "directory holding one; give --model-config PATH for a model without local weights")


def _read_config_json(path: Path) -> ModelShape:
    if not path.is_file():
        raise GuardtuneError(f"model config {path}: no such file")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise GuardtuneError(f"model config {path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise GuardtuneError(f"model config {path}: expected a JSON object")
    return shape_from_config(raw.get("text_config", raw), raw.get("_name_or_path") or path.parent.name)


