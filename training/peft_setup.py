"""Model loading and wrapping per method.

- LoRA family: lora, qlora (NF4 + double quant), dora -> a LoRA adapter.
- full (every weight) and freeze (the last N layers and/or named modules) -> a full model directory.
- prompt_tuning, p_tuning (v1, an MLP/LSTM prompt encoder), prefix_tuning (prefixes at every layer,
  i.e. P-tuning v2) and llama_adapter (gated adaption prompts) -> a PEFT adapter that only the
  transformers engine serves.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from kernel.errors import GuardtuneError
from kernel.manifest import FULL_METHODS, LORA_METHODS, serving_for
from training.adapters import remember_base
from training.config import TrainConfig


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    # bf16 matmuls are 3-10x slower than fp32 on CPUs without AMX, and 4-bit with bf16 compute
    # was measured at ~12x slower: CPU stays fp32, CUDA uses bf16 where supported.
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_base(cfg: TrainConfig, base_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(cfg)
    if cfg.method in FULL_METHODS:
        # Full-weight updates in bf16 lose small steps to rounding; keep master weights fp32 (the Trainer's
        # bf16 autocast still speeds up the matmuls on CUDA).
        dtype = torch.float32
    kwargs = {"dtype": dtype}
    if cfg.quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if cfg.quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        if not torch.cuda.is_available():
            own_unquantized_weights(model)
    model.config.use_cache = False
    if cfg.method in FULL_METHODS:
        remember_base(model, base_dir)  # so the base-vs-tuned comparison after training can load it
    return model


def own_unquantized_weights(model) -> None:
    """On CPU the weights left unquantized (embeddings, norms) load as zero-copy views of the
    memory-mapped checkpoint, and the mapping keeps every page read while quantizing resident: the
    fp32 originals of the 4-bit linears, 0.4 GiB for SmolLM2. Owned copies let the mapping go."""
    import bitsandbytes as bnb

    with torch.no_grad():
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if not isinstance(p, bnb.nn.Params4bit):
                    p.data = p.data.clone()
            for name, b in list(module.named_buffers(recurse=False)):
                module._buffers[name] = b.clone()


def peft_config(cfg: TrainConfig, base_dir=None, n_layers: int | None = None):
    """The peft config for every PEFT method (None for full/freeze, which train the model itself)."""
    import peft

    if cfg.method in LORA_METHODS:
        return peft.LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            use_dora=cfg.method == "dora",
            bias="none",
            task_type="CAUSAL_LM",
        )
    if cfg.method == "prompt_tuning":
        init = {}
        if cfg.prompt_init_text:
            init = dict(prompt_tuning_init=peft.PromptTuningInit.TEXT, prompt_tuning_init_text=cfg.prompt_init_text,
                        tokenizer_name_or_path=str(base_dir))
        else:
            # peft's RANDOM init draws N(0, 1) vectors, far from any real token embedding; starting from real
            # tokens' embeddings trains faster and more stably.
            init = dict(prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB)
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens, **init)
    if cfg.method == "p_tuning":
        return peft.PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
            encoder_reparameterization_type=cfg.p_tuning_encoder.upper(), encoder_hidden_size=cfg.encoder_hidden_size,
        )
    if cfg.method == "prefix_tuning":
        return peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
            prefix_projection=cfg.prefix_projection, encoder_hidden_size=cfg.encoder_hidden_size,
        )
    if cfg.method == "llama_adapter":
        return peft.AdaptionPromptConfig(
            task_type="CAUSAL_LM", adapter_len=cfg.num_virtual_tokens, adapter_layers=cfg.adapter_layers or n_layers,
        )
    return None


def wrap(cfg: TrainConfig, model, base_dir=None):
    """(model to train, trainable parameters, total parameters)."""
    if cfg.method in FULL_METHODS:
        _set_trainable(cfg, model)
        trainable = sum(p.numel() for p in _unique_params(model) if p.requires_grad)
        return model, trainable, sum(p.numel() for p in _unique_params(model))

    from peft import get_peft_model

    if cfg.method == "llama_adapter":
        _check_adaption_prompt(cfg, model)
    peft_model = get_peft_model(model, peft_config(cfg, base_dir, model.config.num_hidden_layers))
    trainable, total = peft_model.get_nb_trainable_parameters()
    return peft_model, trainable, total


def trainer_checkpointing(cfg: TrainConfig) -> bool:
    """Whether the Trainer should turn on gradient checkpointing for this run."""
    if cfg.quantized:
        return False  # prepare_model_for_kbit_training already did
    # Checkpointed layers in transformers drop `past_key_values`, and prefix tuning's prefixes *are* the
    # cache: with checkpointing on they would silently never reach the model.
    return cfg.gradient_checkpointing and cfg.method != "prefix_tuning"


def describe(cfg: TrainConfig) -> str:
    """The method and its main settings, for the log line before training."""
    if cfg.method in LORA_METHODS:
        return f"{cfg.method} r={cfg.rank} alpha={cfg.alpha}"
    if cfg.method == "full":
        return "full (every weight)"
    if cfg.method == "freeze":
        parts = [f"last {cfg.trainable_layers} layers"] if cfg.trainable_layers else []
        return "freeze (trains " + " + ".join(parts + list(cfg.trainable_modules or [])) + ")"
    if cfg.method == "llama_adapter":
        return f"llama_adapter adapter_len={cfg.num_virtual_tokens} layers={cfg.adapter_layers or 'all'}"
    extra = {"p_tuning": f" encoder={cfg.p_tuning_encoder}",
             "prefix_tuning": (" projected" if cfg.prefix_projection else "")
             + (" (gradient checkpointing off: it drops the prefix cache)" if cfg.gradient_checkpointing else ""),
             "prompt_tuning": " text-init" if cfg.prompt_init_text else ""}[cfg.method]
    return f"{cfg.method} virtual_tokens={cfg.num_virtual_tokens}{extra}"


def manifest_fields(cfg: TrainConfig) -> dict:
    """The method-dependent manifest keys: what the artifact is, what serves it, the LoRA shape if any."""
    artifact, serve_with = serving_for(cfg.method)
    lora = cfg.method in LORA_METHODS
    return dict(method=cfg.method, artifact=artifact, serve_with=serve_with,
                rank=cfg.rank if lora else None, alpha=cfg.alpha if lora else None,
                target_modules=cfg.target_modules if lora else None)


def finish_artifact(cfg: TrainConfig, tokenizer, out: Path, base_dir: Path) -> None:
    """What a full model directory needs beside its weights (also after a sharded save by the Trainer)."""
    if cfg.method not in FULL_METHODS:
        return
    tokenizer.save_pretrained(out)  # with the chat template
    if (Path(base_dir) / "generation_config.json").is_file():
        shutil.copy(Path(base_dir) / "generation_config.json", Path(out) / "generation_config.json")
    config = Path(out) / "config.json"
    if config.is_file():  # training ran with use_cache off; the saved model is for serving
        raw = json.loads(config.read_text())
        raw["use_cache"] = True
        config.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def _unique_params(model):
    seen = set()
    for p in model.parameters():  # tied embeddings appear once
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def _set_trainable(cfg: TrainConfig, model) -> None:
    if cfg.method == "full":
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    layers = _decoder_layers(model)
    if cfg.trainable_layers:
        if cfg.trainable_layers > len(layers):
            raise GuardtuneError(f"trainable_layers {cfg.trainable_layers} is more than the {len(layers)} layers "
                                 f"of {cfg.base_model}: use at most {len(layers)}, or method full")
        for layer in layers[len(layers) - cfg.trainable_layers:]:
            layer.requires_grad_(True)
    names = dict(model.named_modules())
    for name in cfg.trainable_modules or []:
        if name not in names or name == "":
            import difflib

            close = difflib.get_close_matches(name, [n for n in names if n.count(".") <= 2], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise GuardtuneError(f"trainable_modules: {cfg.base_model} has no module '{name}'{hint}")
        names[name].requires_grad_(True)  # with tied embeddings, lm_head also trains the input embeddings


def _decoder_layers(model):
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except AttributeError:
            continue
    raise GuardtuneError(f"{type(model).__name__}: cannot find its decoder layers for trainable_layers; "
                         "name modules with trainable_modules instead")


def _check_adaption_prompt(cfg: TrainConfig, model) -> None:
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

    kind = model.config.model_type
    if kind not in TRANSFORMERS_MODEL_CONFIG:
        raise GuardtuneError(f"method llama_adapter supports model types {sorted(TRANSFORMERS_MODEL_CONFIG)}; "
                             f"{cfg.base_model} is '{kind}'")
    n = model.config.num_hidden_layers
    if cfg.adapter_layers is not None and cfg.adapter_layers > n:
        raise GuardtuneError(f"adapter_layers {cfg.adapter_layers} is more than the {n} layers of {cfg.base_model}")
