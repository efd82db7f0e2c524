"""`guardtune estimate`: the breakdown as a table or JSON."""

from __future__ import annotations

import json

from training.estimate.memory import Estimate, GiB, estimate, sequence_length
from training.estimate.options import EstimateConfig, load_estimate_config
from training.estimate.shapes import PRESETS


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
                     "(measured up to 1.24x here); bounded holds to it")
    elif cfg.device == "cpu" and cfg.host_memory == "auto":
        lines.append("note: host_memory auto, train's default, runs fast (peak RSS up to 1.24x this total) unless "
                     "that comes within 20% of the available memory, then bounded, which holds to it")
    if est.host_offload:
        lines.append(f"{'host':<12} {_gib(est.host_offload):>9}  this device's share, offloaded to CPU memory (not in the total)")
    return "\n".join(lines)


def to_json(cfg: EstimateConfig, est: Estimate) -> dict:
    return {"model": est.shape.__dict__, "config": cfg.model_dump(mode="json", by_alias=True),
            "bytes": est.parts() | {"total": est.total, "host_offload": est.host_offload},
            "gib": {k: round(v / GiB, 3) for k, v in (est.parts() | {"total": est.total}).items()},
            "moment": est.moment, "trainable_params": est.trainable_params,
            "total_params": est.detail["total_params"], "precision": est.detail["precision"]}


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
