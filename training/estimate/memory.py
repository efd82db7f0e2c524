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

On CPU the figure is for `host_memory: bounded` (training/host_memory.py), under which freed
tensors of 1 MiB and more go back to the OS. With `fast`, glibc's heap keeps freed activations for
reuse: peak RSS was measured 1.07-1.24x the bounded run's (bench/estimate_bench.py). That
retention depends on allocation order and is not modelled; `auto`, train's default, uses this
estimate with that margin to choose between the two.
The loss head is counted over every position, as the model's own loss computes it; `train`'s SFT
applies the head to trained positions only (training/head_loss.py), so its head peak is lower.

Not modelled either: CUDA caching slack, AdamW foreach temporaries on GPU, ZeRO communication buckets, the reference
model of DPO, and eager (non-SDPA) attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kernel.manifest import FULL_METHODS, LORA_METHODS
from training.estimate.options import EstimateConfig
from training.estimate.shapes import LINEARS, ModelShape, resolve_shape

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
    if cfg.method in LORA_METHODS:
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
    base_trains = cfg.method in FULL_METHODS
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
    total += 0 if cfg.method in FULL_METHODS else trainable_params(cfg, shape) * 4  # PEFT params, fp32
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
    if cfg.method in FULL_METHODS:
        norms = 2 * norm_bytes_per_token(h, a, weight_trains=True, output_saved=True)
        return norms + attention + mlp + i * a  # + the input of down_proj
    if cfg.method in LORA_METHODS:
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


