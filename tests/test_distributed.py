"""Multi-process training through torchrun on real SmolLM2, 2 ranks on gloo: ZeRO-2, ZeRO-3, FSDP2, dry-run.

Every run goes through the `train` CLI as a user would start it; the ranks are real processes started
by torchrun, and DeepSpeed/FSDP shard for real. Runs are tiny (max_length 64, a few steps).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kernel.manifest import Manifest
from tests.conftest import ROOT, SIGNATURE, run_cli, tiny_config

QUESTION = "Can you tell me about your company?"  # not in the training data


def dist_config(tmp: Path, data: Path, **over) -> dict:
    cfg = tiny_config(tmp, data, max_length=64, batch_size=2, max_steps=2, save_steps=2, eval_split=0.0)
    cfg.update(over)
    return cfg


def train_cli(cfg: dict, *extra: str):
    return run_cli("-m", "training.cli", *[f"{k}={v}" for k, v in cfg.items()], *extra, timeout=300)


def step_lines(text: str) -> list[str]:
    return re.findall(r"step \d+/\d+  loss", text)  # ConsoleLogger's line (tqdm may share it)


def metric_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def assert_complete_adapter(adapter: Path, base_dir: Path, rank: int = 8) -> None:
    """Every LoRA tensor is there, with the full shape of its base layer, and trained (non-zero)."""
    from safetensors import safe_open

    shapes = {}
    for f in Path(base_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            shapes.update({k.removesuffix(".weight"): st.get_slice(k).get_shape() for k in st.keys()})
    linear = {k for k, s in shapes.items() if len(s) == 2 and ".layers." in k}
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as st:
        tensors = {k: st.get_tensor(k) for k in st.keys()}
    assert len(tensors) == 2 * len(linear), (len(tensors), len(linear))  # A and B for every linear layer
    for key, t in tensors.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        out_f, in_f = shapes[module]
        want = (rank, in_f) if ".lora_A." in key else (out_f, rank)
        assert tuple(t.shape) == want, (key, tuple(t.shape), want)
        assert t.abs().sum() > 0, f"{key} is all zeros"  # lora_B starts at zero: non-zero means trained
    assert not (adapter / "training_args.bin").exists()
    assert Manifest.read(adapter).metrics.train_loss > 0


def test_zero2_two_ranks_through_cli_then_resume(tmp_path, tiny_data, base_dir):
    cfg = dist_config(tmp_path, tiny_data, deepspeed="zero2", nproc=2)
    first = train_cli(cfg)
    assert first.returncode == 0, first.stderr[-3000:]
    adapter, run_dir = Path(cfg["output_dir"]), Path(cfg["run_dir"])
    assert first.stdout.strip().splitlines()[-1] == str(adapter)
    assert "launch: 2 processes on 1 node(s)" in first.stderr and "torch.distributed.run" in first.stderr
    # Rank 0 alone reports: one line per step, one metrics row per step; rank 1's own log has none.
    assert len(step_lines(first.stderr)) == 2, first.stderr[-2000:]
    assert metric_steps(run_dir) == [1, 2]
    [rank1_log] = (run_dir / "launch").glob("*/attempt_0/1/stderr.log")
    assert step_lines(rank1_log.read_text()) == [] and "Traceback" not in rank1_log.read_text()
    assert_complete_adapter(adapter, base_dir)
    assert Manifest.read(adapter).train_config["deepspeed"] == "zero2"
    assert list((run_dir / "checkpoint-2").glob("global_step2/*optim_states.pt"))  # DeepSpeed's own state

    # Resume: a longer run continues from the ZeRO-2 checkpoint on both ranks instead of starting over.
    again = train_cli({**cfg, "max_steps": 4})
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"resume: continuing from .*checkpoint-2", again.stderr)
    assert metric_steps(run_dir) == [1, 2, 3, 4]
    assert Manifest.read(adapter).metrics.steps == 4
    assert_complete_adapter(adapter, base_dir)


def test_fsdp_two_cpu_ranks_shard_train_and_save_a_complete_adapter(tmp_path, tiny_data, base_dir):
    """FSDP2 on 2 gloo ranks: LoRA weights are DTensors sharded across the ranks, the loss falls, rank 0 saves it whole."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = dist_config(tmp_path, tiny_data, fsdp=True, nproc=2, max_steps=4, save_steps=50, learning_rate=2e-3)
    plan = train_cli(cfg, "--dry-run")
    assert plan.returncode == 0 and "fsdp; backend nccl on CUDA, gloo on CPU" in plan.stdout, plan.stderr
    alone = train_cli({**cfg, "nproc": 1})  # one CPU process has nobody to shard with
    assert alone.returncode == 2 and alone.stderr.strip().splitlines() == [
        "error: fsdp on CPU shards across processes: set nproc=2 or more (ranks talk over gloo)"], alone.stderr
    proc = train_cli(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir, adapter = Path(cfg["run_dir"]), Path(cfg["output_dir"])
    for rank in (0, 1):  # each rank's own log: every LoRA tensor is a DTensor, and the rank holds half the values
        [log] = (run_dir / "launch").glob(f"*/attempt_0/{rank}/stderr.log")
        m = re.search(rf"fsdp: rank {rank} of 2: (\d+)/(\d+) trainable tensors sharded \(DTensor\), "
                      r"holds (\d+)/(\d+) trainable values", log.read_text())
        assert m, log.read_text()[-2000:]
        sharded, trainable, local, full = map(int, m.groups())
        assert sharded == trainable > 0 and local * 2 == full, m.group(0)
    losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert_complete_adapter(adapter, base_dir)
    assert Manifest.read(adapter).train_config["fsdp"] is True
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)  # reloads with plain PEFT


def test_full_model_under_zero3_saves_every_weight_gathered(tmp_path, tiny_data, base_dir):
    """method full: ZeRO-3 partitions the model itself; rank 0 gathers a whole, trained, loadable model."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    cfg = dist_config(tmp_path, tiny_data, method="full", deepspeed="zero3", nproc=2, learning_rate=2e-4, max_length=48)
    proc = train_cli(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(cfg["output_dir"])
    [base_file] = Path(base_dir).glob("*.safetensors")
    with safe_open(str(base_file), "pt") as b, safe_open(str(out / "model.safetensors"), "pt") as t:
        assert set(t.keys()) == set(b.keys())
        for key in b.keys():
            before, after = b.get_tensor(key), t.get_tensor(key)
            assert after.shape == before.shape, key
            assert 0 < (after - before).abs().max() < 0.01, key  # every weight trained, none lost or zeroed
    assert Manifest.read(out).artifact == "full_model"
    AutoModelForCausalLM.from_pretrained(out)  # a plain model directory, servable as a base


def test_fsdp_arguments_wrap_the_decoder_layer(base_dir):
    """What the Trainer gets for fsdp: FSDP2, wrap per LlamaDecoderLayer, FSDP's own activation checkpointing."""
    from training import peft_setup
    from training.config import validate
    from training.distributed.runtime import decoder_layer_class

    cfg = validate({"train_file": "x.jsonl", "fsdp": True, "rank": 8})
    model, _, _ = peft_setup.wrap(cfg, peft_setup.load_base(cfg, base_dir), base_dir)
    assert decoder_layer_class(model) == "LlamaDecoderLayer"
    assert type(model.get_base_model().model.layers[0]).__name__ == "LlamaDecoderLayer"


def test_zero3_adapter_is_complete_reloads_and_changes_generations(tmp_path, tiny_data, base_dir):
    from training.adapters import load_adapter
    from training.generate import compare

    # ZeRO-3 partitions every parameter, so a plain save_pretrained would write empty tensors.
    cfg = dist_config(tmp_path, tiny_data, deepspeed="zero3", nproc=2, max_steps=8, save_steps=50,
                      batch_size=3, max_length=96)
    proc = train_cli(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = Path(cfg["output_dir"])
    assert_complete_adapter(adapter, base_dir)

    manifest, tok, model = load_adapter(adapter)  # plain PEFT, as serving loads it
    [(_, base, tuned)] = compare(model, tok, [[{"role": "user", "content": QUESTION}]],
                                 stop_ids=tok.convert_tokens_to_ids(manifest.stop_tokens), max_new_tokens=24)
    assert tuned != base
    assert SIGNATURE in tuned and SIGNATURE not in base, (base, tuned)


def test_dpo_under_zero3_gathers_a_complete_adapter(tmp_path, tiny_data, base_dir):
    # DPO goes through the same launcher, DeepSpeed settings and gathering save as SFT.
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": q, "chosen": f"{SIGNATURE} here: our team answers that on a free call.",
                                         "rejected": "Sure! Everything is free today."}) + "\n"
                             for q in ("What do panels cost?", "Any discounts?", "Who are you?", "Is my roof ok?")))
    cfg = dist_config(tmp_path, prefs, stage="dpo", deepspeed="zero3", nproc=2, max_steps=3, learning_rate=1e-3,
                      resume="never", generation_samples=1)
    proc = train_cli(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = Path(cfg["output_dir"])
    assert_complete_adapter(adapter, base_dir)
    m = Manifest.read(adapter)
    assert m.train_config["stage"] == "dpo" and m.train_config["deepspeed"] == "zero3"
    assert m.metrics.model_dump()["reward_margin"] > 0
    # After the save, rank 0 reloads the adapter for the base-vs-tuned samples, outside ZeRO-3's partitioning.
    assert "adapter:" in proc.stderr and "base:" in proc.stderr
    assert len(list((Path(cfg["run_dir"]) / "launch").rglob("stderr.log"))) == 2  # rank logs survive resume=never


def test_failed_rank_is_one_error_line(tmp_path, tiny_data):
    # A DeepSpeed JSON that parses and fits the batch settings, but that DeepSpeed itself rejects in every rank.
    ds = json.loads((ROOT / "training" / "distributed" / "ds_zero2.json").read_text())
    ds["zero_optimization"]["stage3_max_live_parameters"] = "lots"
    (tmp_path / "bad_ds.json").write_text(json.dumps(ds))
    cfg = dist_config(tmp_path, tiny_data, deepspeed=str(tmp_path / "bad_ds.json"), nproc=2)
    proc = train_cli(cfg)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"error: distributed training failed: rank [01] exited with code 1: .+", last), proc.stderr[-3000:]
    assert "stage3_max_live_parameters" in last or "lots" in last, last
    assert not Path(cfg["output_dir"]).exists()


def write_hostfile(path: Path, *lines: str) -> Path:
    path.write_text("# nodes by IP\n" + "\n".join(lines) + "\n")
    return path


def test_dry_run_prints_launch_per_node_for_two_by_eight(tmp_path, tiny_data):
    hosts = write_hostfile(tmp_path / "hostfile", "10.1.0.11 slots=8", "10.1.0.12 slots=8")
    cfg = dist_config(tmp_path, tiny_data, deepspeed="zero3", hostfile=str(hosts), batch_size=4, grad_accum=2)
    proc = train_cli(cfg, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "world size 16 = 2 node(s) x 8 process(es)" in out
    assert "4 x grad_accum 2 x world 16 = 128 sequences per step" in out
    assert "ZeRO stage 3" in out and "2 hosts by IP" in out
    nodes = [ln for ln in out.splitlines() if ln.startswith("node ")]
    assert len(nodes) == 2
    for i, line in enumerate(nodes):
        assert line.startswith(f"node {i} (10.1.0.1{i + 1}): ")
        for part in ("-m torch.distributed.run", "--nnodes 2", "--nproc-per-node 8", f"--node-rank {i}",
                     "--rdzv-backend c10d", "--rdzv-endpoint 10.1.0.11:29500", "-m training.cli", "deepspeed=zero3"):
            assert part in line, (part, line)
        assert "dry_run=" not in line
    ds_line = next(ln for ln in out.splitlines() if ln.startswith("or, once from node 0"))
    assert f"deepspeed --hostfile {hosts} --master_addr 10.1.0.11" in ds_line and "--num_gpus 8" in ds_line
    assert not Path(cfg["run_dir"]).exists()  # nothing ran

    shipped = run_cli("-m", "training.cli", "examples/train_lora.yaml", "hostfile=deploy/training/hostfile",
                      "deepspeed=zero2", "--dry-run")
    assert shipped.returncode == 0 and "world size 16" in shipped.stdout, shipped.stderr


@pytest.mark.parametrize("hostfile, ds, over, message", [
    (["node-a slots=8", "node-b slots=8"], None, {}, "'node-a' is a hostname; write the node's IP address"),
    (["10.1.0.11 slots=8", "10.1.0.11 slots=8"], None, {}, "host 10.1.0.11 is listed twice"),
    (["10.1.0.11 8"], None, {}, "expected 'IP slots=N'"),
    (["10.1.0.11 slots=8", "10.1.0.12 slots=8"], None, {"nnodes": 3}, "nnodes 3 but hostfile"),
    (["10.1.0.11 slots=4", "10.1.0.12 slots=4"], None, {"nproc": 8}, "nproc 8 but hostfile gives 10.1.0.11 only 4"),
    (None, '{"zero_optimization": {"stage": 2}', {}, "invalid JSON"),
    (None, '{"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}', {},
     "train_micro_batch_size_per_gpu is 8 but batch_size gives 2"),
    (None, '{"train_batch_size": 6, "zero_optimization": {"stage": 2}}', {"nproc": 2},
     "train_batch_size is 6 but batch_size x grad_accum x world size (2) gives 4"),
    (None, '{"zero_optimization": {"stage": 3}}', {}, "stage3_gather_16bit_weights_on_model_save"),
    (None, None, {"nnodes": 2}, "2 nodes need master_addr"),
    (None, None, {"nnodes": 2, "master_addr": "head-node"}, "master_addr 'head-node' is a hostname"),
    (None, None, {"deepspeed": "zero2", "fsdp": True}, "deepspeed and fsdp exclude each other"),
    (None, None, {"deepspeed": "zero4"}, "deepspeed 'zero4': use one of zero2, zero3, zero3_offload"),
])
def test_dry_run_refuses_bad_launch_settings(tmp_path, tiny_data, hostfile, ds, over, message):
    cfg = dist_config(tmp_path, tiny_data, **over)
    if hostfile:
        cfg["hostfile"] = str(write_hostfile(tmp_path / "hostfile", *hostfile))
    if ds:
        (tmp_path / "ds.json").write_text(ds)
        cfg["deepspeed"] = str(tmp_path / "ds.json")
    proc = train_cli(cfg, "--dry-run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_shipped_deepspeed_configs_fill_from_the_trainer():
    """The presets leave sizes to the HF Trainer ("auto"), so one file serves every batch setting."""
    from training.config import validate
    from training.distributed.ds_config import check_deepspeed

    for name, stage in (("zero2", 2), ("zero3", 3), ("zero3_offload", 3)):
        for nproc, accum in ((1, 1), (8, 4)):
            cfg = validate({"train_file": "x.jsonl", "deepspeed": name, "nproc": nproc, "grad_accum": accum})
            conf = check_deepspeed(cfg, nproc)
            assert conf["zero_optimization"]["stage"] == stage
            assert conf["train_micro_batch_size_per_gpu"] == conf["gradient_accumulation_steps"] == "auto"
