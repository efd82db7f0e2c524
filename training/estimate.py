"""Peak training memory per device, predicted from the model's shape and the training config.

One function per component; every figure is bytes. The model follows what `train` does:
- weights: the base in its load dtype (NF4 + double quant for qlora, whose other weights
  `prepare_model_for_kbit_training` keeps in fp32) plus the trainable parameters, which PEFT
  keeps in fp32;
- gradients and AdamW states for the trainable parameters only;
- activations: what autograd saves for backward, counted tensor by tensor for a Llama-style
  decoder layer (SDPA attention, no batch x heads x seq x seq tensor), the layer inputs only
  with gradient checkpointing, plus the loss head: logits, their fp32 log-softmax and its
  gradients, which for a 49k vocabulary outweigh a small model's layers;
- runtime: a stated constant for what the process holds before the model exists.

ZeRO stage 1 splits optimizer states over the devices, stage 2 also gradients, stage 3 (and
FSDP full shard) also weights; CPU offload moves them to host memory, reported apart.

The total is the memory at the peak moment, which is either the start of backward (weights,
optimizer states, every saved activation and the loss head) or its end (every gradient, the
activations freed). Gradients are created during backward and freed by the optimizer step
(`zero_grad(set_to_none=True)`), so they count at the start only when something keeps them
alive across micro-batches: gradient accumulation, or DeepSpeed/FSDP gradient buffers.

On CPU the figure is for `train`'s default `host_memory: bounded` (training/host_memory.py), under
which freed tensors of 1 MiB and more go back to the OS. With `fast`, glibc's heap keeps freed
activations for reuse: peak RSS was measured 1.07-1.24x the bounded run's (bench/estimate_bench.py).
That retention depends on allocation order and is not modelled.

Not modelled either: CUDA caching slack, AdamW foreach temporaries on GPU, ZeRO communication buckets, the reference
model of DPO, and eager (non-SDPA) attention.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kernel.configfile import explain, read_mapping
from kernel.errors import GuardtuneError

GiB = 2**30

# What a CPU training process holds before the model's first weight is touched: Python, torch,
# transformers, peft and datasets imported, the tokenizer and the tokenised data loaded. Measured
# by bench/estimate_bench.py (a process doing exactly that, ru_maxrss) on x86_64 with torch 2.13,
# transformers 5.19 and the SmolLM2 tokenizer: 0.687 GiB. It is a constant of the software stack,
# not of the configuration.
CPU_RUNTIME_BYTES = int(0.687 * GiB)
# A CUDA process: the CUDA context with torch's kernels and the cuBLAS workspace, as nvidia-smi
# counts it beyond the tensors (stated, typically 0.5 to 1 GiB; not measured here).
CUDA_RUNTIME_BYTES = int(0.75 * GiB)

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("full", "freeze", "lora", "qlora", "dora", "prompt_tuning", "p_tuning", "prefix_tuning", "llama_adapter")
PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning", "llama_adapter")


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
    from kernel.models import PACKAGED, resolve_base_model

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


class EstimateConfig(BaseModel):
    """What the estimate depends on. Keys shared with `train` have the same names and meaning."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    model: str = Field("smollm2-135m-instruct", description="a preset, a config.json or directory, or a base alias")
    model_config_path: Path | None = Field(None, alias="model_config", description="a config.json (no weights needed)")
    method: Literal["full", "freeze", "lora", "qlora", "dora", "prompt_tuning", "p_tuning", "prefix_tuning",
                    "llama_adapter"] = "lora"
    device: Literal["cpu", "cuda"] = Field("cuda", description="cpu: fp32 compute; cuda: bf16 compute")
    precision: Literal["auto", "fp32", "bf16", "fp16", "mixed"] = Field(
        "auto", description="auto: what `train` uses (fp32 on cpu; bf16 base on cuda, full/freeze mixed); "
                            "mixed: 16-bit weights and gradients with fp32 master weights in the optimizer")
    quantization: Literal["auto", "none", "nf4"] = Field("auto", description="auto: nf4 for qlora, none otherwise")
    double_quant: bool = Field(True, description="nf4: quantize the block scales too (0.127 bit/param saved)")
    optimizer: Literal["adamw", "adamw_8bit", "sgd"] = "adamw"
    rank: int = Field(16, ge=1, le=1024)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    trainable_layers: int = Field(2, ge=1, description="freeze: the last N layers train")
    num_virtual_tokens: int = Field(16, ge=1, description="prompt methods: virtual tokens; llama_adapter: adapter_len")
    encoder_hidden_size: int = Field(256, ge=1, description="p_tuning (and projected prefixes): encoder width")
    p_tuning_encoder: Literal["mlp", "lstm"] = "mlp"
    prefix_projection: bool = False
    adapter_layers: int | None = Field(None, ge=1, description="llama_adapter: top layers adapted (default all)")
    batch_size: int = Field(4, ge=1, description="per device (micro-batch)")
    max_length: int = Field(1024, ge=1, description="tokens per sequence (the estimate assumes full-length rows)")
    grad_accum: int = Field(1, ge=1)
    gradient_checkpointing: bool = True
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage")
    offload: Literal["none", "optimizer", "all"] = Field("none", description="ZeRO CPU offload: optimizer states, "
                                                                             "or also parameters (stage 3)")
    fsdp: bool = Field(False, description="FSDP full shard: like ZeRO-3")
    devices: int = Field(1, ge=1, description="data-parallel devices in all (nproc x nnodes)")
    host_memory: Literal["bounded", "fast"] = Field(
        "bounded", description="cpu: train's host allocator setting; the estimate holds for bounded")

    @model_validator(mode="after")
    def _check(self) -> "EstimateConfig":
        if self.method == "qlora" and self.quantization == "none":
            raise ValueError("method qlora requires 4-bit quantization: set quantization: nf4 (or auto)")
        if self.method != "qlora" and self.quantization == "nf4":
            raise ValueError(f"quantization nf4 is only used with method qlora, not {self.method}")
        if isinstance(self.target_modules, list):
            bad = [m for m in self.target_modules if m not in LINEARS]
            if bad:
                raise ValueError(f"target module '{bad[0]}' is not a decoder linear layer ({', '.join(LINEARS)})")
        if self.offload == "all" and self.zero_stage != 3 and not self.fsdp:
            raise ValueError("offload: all (parameters too) needs zero_stage 3 or fsdp")
        if self.offload != "none" and self.zero_stage == 0 and not self.fsdp:
            raise ValueError("offload needs a ZeRO stage (zero_stage 1-3) or fsdp")
        if self.zero_stage and self.fsdp:
            raise ValueError("pick one of zero_stage and fsdp")
        return self

    @property
    def quantized(self) -> bool:
        return self.method == "qlora"

    @property
    def shard_stage(self) -> int:
        """FSDP full shard partitions like ZeRO-3."""
        return 3 if self.fsdp else self.zero_stage

    def resolved_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        if self.device == "cpu":
            return "fp32"
        return "mixed" if self.method in ("full", "freeze") else "bf16"


@dataclass
class Estimate:
    """Bytes per device at the peak moment; parts sum to `total`."""

    shape: ModelShape
    weights: int
    gradients: int
    optimizer: int
    activations: int
    runtime: int
    moment: str
    trainable_params: int
    host_offload: int = 0
    detail: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.runtime

    def parts(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "runtime": self.runtime}


# ---- parameters ---------------------------------------------------------------------------------

def trainable_params(cfg: EstimateConfig, shape: ModelShape) -> int:
    """Parameters the optimizer updates."""
    h, layers, p = shape.hidden_size, shape.num_layers, cfg.num_virtual_tokens
    if cfg.method == "full":
        return shape.total_params()
    if cfg.method == "freeze":
        return min(cfg.trainable_layers, layers) * shape.layer_params()
    if cfg.method in ("lora", "qlora", "dora"):
        per_layer = sum(cfg.rank * (i + o) + (o if cfg.method == "dora" else 0)  # DoRA: a magnitude per output
                        for i, o in lora_targets(cfg, shape).values())
        return layers * per_layer
    if cfg.method == "prompt_tuning":
        return p * h
    if cfg.method == "p_tuning":
        e = cfg.encoder_hidden_size
        if cfg.p_tuning_encoder == "mlp":
            encoder = (h * e + e) + (e * e + e) + (e * h + h)
        else:  # two bidirectional LSTM layers, then a two-layer MLP head
            lstm = 2 * 4 * (e * (h + e) + 2 * e) + 2 * 4 * (e * (2 * e + e) + 2 * e)
            encoder = lstm + (2 * e * 2 * e + 2 * e) + (2 * e * h + h)
        return p * h + encoder
    if cfg.method == "prefix_tuning":
        width = layers * 2 * shape.kv_dim  # a key and a value per layer (peft sizes them to the kv heads)
        if cfg.prefix_projection:
            e = cfg.encoder_hidden_size
            return p * h + (h * e + e) + (e * width + width)
        return p * width
    # llama_adapter: an adaption prompt and a gate per adapted layer
    return min(cfg.adapter_layers or layers, layers) * (p * h + 1)


def lora_targets(cfg: EstimateConfig, shape: ModelShape) -> dict[str, tuple[int, int]]:
    names = LINEARS if cfg.target_modules == "all-linear" else cfg.target_modules
    return {n: shape.linears()[n] for n in names}


def nf4_bytes_per_param(double_quant: bool) -> float:
    """4 bits plus the block scales: one per 64 weights, fp32, or with double quant 8-bit scales and
    one fp32 scale per 256 of them (the QLoRA paper's 0.5 -> 0.127 bit/param saving)."""
    scales = (1 / 64 + 4 / (64 * 256)) if double_quant else 4 / 64
    return 0.5 + scales


# ---- components ---------------------------------------------------------------------------------

def trainable_bytes(cfg: EstimateConfig) -> tuple[int, int, int]:
    """(weight, gradient, optimizer) bytes per trainable parameter."""
    prec = cfg.resolved_precision()
    base_trains = cfg.method in ("full", "freeze")
    if base_trains and prec == "mixed":
        w, g, master = 2, 2, 4  # ZeRO's accounting: 16-bit weights and gradients, fp32 master copy
    elif base_trains and prec in ("bf16", "fp16"):
        w, g, master = 2, 2, 0  # pure 16-bit: AdamW keeps its states in the parameter dtype
    else:
        w, g, master = 4, 4, 0  # fp32 training, and PEFT parameters (peft keeps them in fp32)
    state = {"adamw": 2 * (w if (base_trains and prec in ("bf16", "fp16")) else 4), "adamw_8bit": 2, "sgd": 0}
    return w, g, master + state[cfg.optimizer]


def base_weight_bytes(cfg: EstimateConfig, shape: ModelShape) -> int:
    """Frozen base weights (for full/freeze: the whole model, counted at the trainable dtype)."""
    prec = cfg.resolved_precision()
    if cfg.method == "full":
        return shape.total_params() * trainable_bytes(cfg)[0]
    dense = DTYPE_BYTES["fp32" if prec == "mixed" else prec]
    if cfg.method == "freeze":
        frozen = shape.total_params() - trainable_params(cfg, shape)
        return frozen * dense + trainable_params(cfg, shape) * trainable_bytes(cfg)[0]
    if cfg.quantized:
        linear = shape.num_layers * shape.layer_linear_params()
        rest = shape.total_params() - linear  # embeddings, head, norms: prepare_model_for_kbit_training -> fp32
        return int(linear * nf4_bytes_per_param(cfg.double_quant)) + rest * 4
    return shape.total_params() * dense


def gathered_bytes(cfg: EstimateConfig, shape: ModelShape) -> int:
    """ZeRO-3/FSDP working set: the layer being computed and the prefetched next one, unsharded."""
    if cfg.shard_stage < 3:
        return 0
    return 2 * shape.layer_params() * (4 if cfg.resolved_precision() == "fp32" else 2)


def weights_bytes(cfg: EstimateConfig, shape: ModelShape) -> tuple[int, int]:
    """(on device, offloaded to host). ZeRO-3/FSDP keep 1/N plus the gathered layers."""
    total = base_weight_bytes(cfg, shape)
    total += 0 if cfg.method in ("full", "freeze") else trainable_params(cfg, shape) * 4  # PEFT params, fp32
    if cfg.shard_stage < 3:
        return total, 0
    if cfg.offload == "all":
        return gathered_bytes(cfg, shape), total // cfg.devices  # each rank's shard lives in host memory
    return total // cfg.devices + gathered_bytes(cfg, shape), 0


def gradients_bytes(cfg: EstimateConfig, shape: ModelShape) -> int:
    grads = trainable_params(cfg, shape) * trainable_bytes(cfg)[1]
    return grads // cfg.devices if cfg.shard_stage >= 2 else grads


def optimizer_bytes(cfg: EstimateConfig, shape: ModelShape) -> tuple[int, int]:
    """(on device, offloaded to host)."""
    states = trainable_params(cfg, shape) * trainable_bytes(cfg)[2]
    if cfg.shard_stage >= 1:
        states //= cfg.devices
    return (0, states) if cfg.offload != "none" else (states, 0)


def model_states_bytes(cfg: EstimateConfig, shape: ModelShape) -> int:
    """Weights, gradients and optimizer states on one device, as the ZeRO paper counts them
    (without the gathered working set and without activations)."""
    return (weights_bytes(cfg, shape)[0] - gathered_bytes(cfg, shape) + gradients_bytes(cfg, shape)
            + optimizer_bytes(cfg, shape)[0])


def sequence_length(cfg: EstimateConfig) -> int:
    """Tokens the layers see: prompt tuning and p-tuning prepend their virtual tokens."""
    return cfg.max_length + (cfg.num_virtual_tokens if cfg.method in ("prompt_tuning", "p_tuning") else 0)


def activation_dtype_bytes(cfg: EstimateConfig) -> int:
    return 4 if cfg.resolved_precision() == "fp32" else 2


def norm_bytes_per_token(h: int, a: int, weight_trains: bool, output_saved: bool) -> int:
    """An RMSNorm saves its input upcast to fp32 (for the square and the product) and the rsqrt;
    the normalised input only if its weight trains, and its output only if a trainable linear reads it."""
    return 4 * h + 4 + (h * a if weight_trains else 0) + (h * a if output_saved else 0)


def layer_activation_bytes_per_token(cfg: EstimateConfig, shape: ModelShape) -> int:
    """Bytes autograd saves for backward in one decoder layer, per token (no recomputation).

    Counted tensor by tensor for HF's LlamaDecoderLayer with SDPA attention, and checked exactly
    (to the byte) against torch's saved-tensor hooks for full, LoRA with and without dropout:
    - SDPA saves q, k, v, its output (which o_proj reads in place) and a log-sum-exp per head;
    - SwiGLU saves the gate and up projections and the SiLU output;
    - a linear whose weight trains saves its input; a frozen (or 4-bit) one saves nothing;
    - LoRA with dropout saves each targeted linear's dropped-out input and the dropout mask
      (a float tensor on CPU, bytes on CUDA's fused kernel) plus the rank-r intermediate;
      without dropout the shared input is saved once.
    """
    h, q, kv, i = shape.hidden_size, shape.q_dim, shape.kv_dim, shape.intermediate_size
    a = activation_dtype_bytes(cfg)
    attention = (2 * q + 2 * kv) * a + shape.num_heads * 4
    mlp = 3 * i * a
    inputs = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": q, "gate_proj": h, "up_proj": h, "down_proj": i}
    if cfg.method in ("full", "freeze"):
        norms = 2 * norm_bytes_per_token(h, a, weight_trains=True, output_saved=True)
        return norms + attention + mlp + i * a  # + the input of down_proj
    if cfg.method in ("lora", "qlora", "dora"):
        targets = lora_targets(cfg, shape)
        lora = len(targets) * cfg.rank * a  # lora_A's output, saved by lora_B
        if cfg.method == "dora":
            lora += sum(2 * shape.linears()[n][1] * a for n in targets)  # base and LoRA outputs, scaled by magnitude
        if cfg.dropout > 0:
            mask = a if cfg.device == "cpu" else 1
            lora += sum(inputs[n] * (a + mask) for n in targets)
            reads_n1 = reads_n2 = False
        else:
            reads_n1 = bool({"q_proj", "k_proj", "v_proj"} & set(targets))
            reads_n2 = bool({"gate_proj", "up_proj"} & set(targets))
            lora += i * a if "down_proj" in targets else 0
        norms = (norm_bytes_per_token(h, a, weight_trains=False, output_saved=reads_n1)
                 + norm_bytes_per_token(h, a, weight_trains=False, output_saved=reads_n2))
        return norms + attention + mlp + lora
    norms = 2 * norm_bytes_per_token(h, a, weight_trains=False, output_saved=False)
    if cfg.method == "prefix_tuning":
        # the layer's keys and values also cover the virtual tokens, spread here over the real ones
        attention += int(2 * kv * a * cfg.num_virtual_tokens / cfg.max_length)
        if cfg.device == "cpu":
            # the prefix needs an explicit attention mask, which sends CPU SDPA down its math path:
            # it keeps the fp32 attention probabilities, heads x (prefix + sequence) per token
            attention += shape.num_heads * (cfg.num_virtual_tokens + cfg.max_length) * 4
    if cfg.method == "llama_adapter":
        # adapted layers recompute q for the adaption prompt and keep its softmax (fp32 and cast)
        adapted = min(cfg.adapter_layers or shape.num_layers, shape.num_layers) / shape.num_layers
        attention += int(adapted * (q * a + shape.num_heads * cfg.num_virtual_tokens * (4 + 2 * a)))
    return norms + attention + mlp  # prompt_tuning, p_tuning: frozen linears over the longer sequence


def loss_head_bytes(cfg: EstimateConfig, shape: ModelShape) -> int:
    """Peak of the output head: at the start of backward the fp32 log-softmax (saved by the loss),
    the gradient of the loss w.r.t. it and the gradient w.r.t. the logits are alive together;
    16-bit logits also get an fp32 copy for the loss, then a 16-bit gradient."""
    tokens = cfg.batch_size * sequence_length(cfg)
    a = activation_dtype_bytes(cfg)
    per_token = shape.vocab_size * (3 * 4 + (a if a != 4 else 0))
    head_trains = cfg.method == "full"  # the output head (or the tied embedding) trains: it keeps its input
    per_token += norm_bytes_per_token(shape.hidden_size, a, weight_trains=head_trains, output_saved=head_trains)
    return tokens * per_token


def activations_bytes(cfg: EstimateConfig, shape: ModelShape) -> int:
    """Saved activations of every layer, or with gradient checkpointing the layer inputs plus one
    layer being recomputed, plus the loss head (the head's peak comes before any recomputation)."""
    tokens = cfg.batch_size * sequence_length(cfg)
    per_layer = layer_activation_bytes_per_token(cfg, shape) * tokens
    head = loss_head_bytes(cfg, shape)
    if cfg.method == "freeze":  # nothing below the first trained layer needs saving
        layers = min(cfg.trainable_layers, shape.num_layers)
    else:
        layers = shape.num_layers
    if not cfg.gradient_checkpointing:
        return layers * per_layer + head
    checkpoints = layers * shape.hidden_size * activation_dtype_bytes(cfg) * tokens
    return checkpoints + max(head, per_layer)


def runtime_bytes(cfg: EstimateConfig) -> int:
    return CPU_RUNTIME_BYTES if cfg.device == "cpu" else CUDA_RUNTIME_BYTES


def estimate(cfg: EstimateConfig, shape: ModelShape | None = None) -> Estimate:
    shape = shape or resolve_shape(cfg.model, cfg.model_config_path)
    weights, weights_host = weights_bytes(cfg, shape)
    grads = gradients_bytes(cfg, shape)
    optim, optim_host = optimizer_bytes(cfg, shape)
    acts = activations_bytes(cfg, shape)
    # Gradients outlive a backward pass only in accumulation or in DeepSpeed/FSDP buffers.
    grads_at_start = grads if (cfg.grad_accum > 1 or cfg.shard_stage > 0) else 0
    start = grads_at_start + acts
    end = grads + cfg.batch_size * sequence_length(cfg) * shape.hidden_size * 4  # plus the hidden-state gradient
    at_start = start >= end
    return Estimate(
        shape=shape, weights=weights, gradients=grads_at_start if at_start else grads, optimizer=optim,
        activations=acts if at_start else end - grads, runtime=runtime_bytes(cfg),
        moment="start of backward" if at_start else "end of backward",
        trainable_params=trainable_params(cfg, shape), host_offload=weights_host + optim_host,
        detail={"total_params": shape.total_params(), "precision": cfg.resolved_precision(),
                "activations_saved": acts, "gradients_all": grads},
    )


# ---- config loading and printing -----------------------------------------------------------------

# `train` keys that do not change memory; a train config can be passed as is.
IGNORED_TRAIN_KEYS = {
    "task", "train_file", "eval_file", "eval_split", "skip_bad_rows", "stage", "system_prompt", "train_on_prompt",
    "mask_history", "block_size", "packing", "dedup_exact", "dedup_near", "filler_words", "banned_phrases",
    "shard_rows", "alpha", "merge", "trainable_modules", "prompt_init_text", "learning_rate", "max_steps",
    "num_epochs", "warmup_ratio", "lr_scheduler", "weight_decay", "seed", "output_dir", "run_dir", "logging_steps",
    "eval_steps", "save_steps", "save_total_limit", "resume", "report_to", "swanlab_project", "generation_samples",
    "node_rank", "hostfile", "master_addr", "master_port", "launcher", "dry_run", "beta", "dpo_loss",
    "label_smoothing", "datasets", "mix_size", "eval_forgetting", "forgetting_file", "forgetting_rows",
}


def load_estimate_config(path: str | Path | None, overrides: list[str], *, model: str | None = None,
                         model_config: str | None = None, device: str | None = None) -> EstimateConfig:
    """A train config (or none) plus key=value overrides, mapped onto the estimate's keys."""
    from training.config import parse_overrides

    raw = read_mapping(path, "config") if path else {}
    raw.update(parse_overrides(overrides))
    if "base_model" in raw:
        raw.setdefault("model", raw.pop("base_model"))
    _map_distributed(raw)
    for key in IGNORED_TRAIN_KEYS & set(raw):
        raw.pop(key)
    if model:
        raw["model"] = model
    if model_config:
        raw["model_config"] = model_config
    if device:
        raw["device"] = device
    try:
        cfg = EstimateConfig.model_validate(raw)
    except ValidationError as exc:
        fields = set(EstimateConfig.model_fields) | {"model_config", "base_model"} | IGNORED_TRAIN_KEYS
        raise GuardtuneError(f"{path or 'estimate'}: {explain(exc.errors()[0], fields)}") from None
    return cfg


def _map_distributed(raw: dict) -> None:
    """train's `deepspeed` (preset name or JSON), `nproc` x `nnodes` onto zero_stage, offload, devices."""
    ds = raw.pop("deepspeed", None)
    if ds:
        from training.distributed.ds_config import deepspeed_path

        p = deepspeed_path(str(ds))
        if not p.is_file():
            raise GuardtuneError(f"deepspeed {p}: no such file")
        try:
            zero = json.loads(p.read_text()).get("zero_optimization", {})
        except json.JSONDecodeError as exc:
            raise GuardtuneError(f"deepspeed {p}: invalid JSON ({exc.msg})") from None
        raw.setdefault("zero_stage", zero.get("stage", 0))
        opt = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        par = zero.get("offload_param", {}).get("device", "none") not in ("none", None)
        raw.setdefault("offload", "all" if par else "optimizer" if opt else "none")
    nproc, nnodes = raw.pop("nproc", None), raw.pop("nnodes", None)
    if nproc is not None or nnodes is not None:
        raw.setdefault("devices", int(nproc or 1) * int(nnodes or 1))


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def format_table(cfg: EstimateConfig, est: Estimate) -> str:
    s = est.shape
    dist = (f"ZeRO-{cfg.zero_stage}" if cfg.zero_stage else "FSDP full shard" if cfg.fsdp else "no sharding")
    if cfg.offload != "none":
        dist += f", CPU offload of {cfg.offload if cfg.offload == 'optimizer' else 'optimizer and parameters'}"
    runtime_note = ("stated constant: Python, torch, transformers, tokenizer and data (measured on CPU)"
                    if cfg.device == "cpu" else "stated constant: CUDA context, kernels, cuBLAS workspace")
    rows = [
        ("weights", est.weights, f"{est.detail['total_params'] / 1e9:.3g}B params"
         + (", NF4 double-quant linears, fp32 rest" if cfg.quantized else f", {est.detail['precision']}")),
        ("gradients", est.gradients, f"{est.trainable_params / 1e6:.4g}M trainable params"
         + ("" if est.gradients else " (created during backward, none alive at the peak)")),
        ("optimizer", est.optimizer, f"{cfg.optimizer}" + (" (offloaded)" if cfg.offload != "none" else "")),
        ("activations", est.activations, f"batch {cfg.batch_size} x {sequence_length(cfg)} tokens, gradient "
         f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, incl. loss head"),
        ("runtime", est.runtime, runtime_note),
    ]
    lines = [f"{s.name} ({s.num_layers} layers, hidden {s.hidden_size}, {s.num_heads}/{s.num_kv_heads} heads, "
             f"vocab {s.vocab_size}), {cfg.method} on {cfg.device}, {cfg.devices} device(s), {dist}",
             f"{'component':<12} {'GiB':>9}  note"]
    lines += [f"{name:<12} {_gib(v):>9}  {note}" for name, v, note in rows]
    lines.append(f"{'total':<12} {_gib(est.total):>9}  per device, at the {est.moment}")
    if cfg.device == "cpu" and cfg.host_memory == "fast":
        lines.append("note: host_memory fast lets glibc keep freed activations, so peak RSS can exceed this total "
                     "(measured up to 1.24x here); bounded, train's default, holds to it")
    if est.host_offload:
        lines.append(f"{'host':<12} {_gib(est.host_offload):>9}  this device's share, offloaded to CPU memory (not in the total)")
    return "\n".join(lines)


def to_json(cfg: EstimateConfig, est: Estimate) -> dict:
    return {"model": est.shape.__dict__, "config": cfg.model_dump(mode="json", by_alias=True),
            "bytes": est.parts() | {"total": est.total, "host_offload": est.host_offload},
            "gib": {k: round(v / GiB, 3) for k, v in (est.parts() | {"total": est.total}).items()},
            "moment": est.moment, "trainable_params": est.trainable_params,
            "total_params": est.detail["total_params"], "precision": est.detail["precision"]}


# ---- `guardtune estimate` ------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("config", nargs="?", help="a train YAML config (optional); keys that do not change memory are ignored")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="train keys or estimate keys, e.g. method=qlora max_length=2048 zero_stage=3 devices=8")
    p.add_argument("--model", help=f"preset ({', '.join(sorted(PRESETS))}), config.json, model dir or base alias")
    p.add_argument("--model-config", metavar="PATH", help="a config.json: estimate a model without its weights")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default cuda (bf16); cpu: fp32 and the measured runtime")
    p.add_argument("--json", action="store_true", help="print the breakdown as JSON")
    p.add_argument("--keys", action="store_true", help="list the estimate's keys with defaults and exit")


def run(args) -> int:
    if args.keys:
        for name, f in EstimateConfig.model_fields.items():
            print(f"{f.alias or name:24} {f.default!r:24} {f.description or ''}")
        return 0
    overrides = list(args.overrides)
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        overrides.insert(0, args.config)  # `guardtune estimate key=value ...` with no file
        args.config = None
    cfg = load_estimate_config(args.config, overrides, model=args.model, model_config=args.model_config,
                               device=args.device)
    est = estimate(cfg)
    print(json.dumps(to_json(cfg, est), indent=2) if args.json else format_table(cfg, est))
    return 0
