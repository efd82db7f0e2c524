"""host_memory: bounded gives freed blocks back to the OS; fast lets glibc's heap keep them. Real glibc,
in a fresh process each, since mallopt changes the whole process."""

from __future__ import annotations

import json
import os

from tests.conftest import run_cli

CHILD = r"""
import json, os, sys
from training.host_memory import configure

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

done = configure(sys.argv[1], on_cpu=True)
big = bytearray(8 << 20)  # an 8 MiB block freed: glibc's dynamic threshold rises past what follows
del big
blocks, keep = [], []
base = rss()
for _ in range(120):
    blocks.append(bytearray(3 << 19))  # 1.5 MiB, zero-filled so every page is touched
    keep.append(bytearray(2048))  # a live block after each: freed blocks become holes, not a heap top to trim
peak = rss()
blocks.clear()
print(json.dumps({"done": done, "grown": peak - base, "kept": rss() - base}))
"""


def child(mode: str, env: dict | None = None) -> dict:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | (env or {})
    proc = run_cli("-c", CHILD, mode, timeout=60, env=full_env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_bounded_returns_freed_tensors_and_fast_keeps_them():
    bounded, fast = child("bounded"), child("fast")
    assert bounded["done"] == "host memory: bounded (glibc mmap threshold 1 MiB)" and fast["done"] is None
    for r in (bounded, fast):
        assert r["grown"] > 150 << 20  # 180 MiB of blocks were really resident
    assert bounded["kept"] < 16 << 20
    assert fast["kept"] > 150 << 20


def test_a_threshold_the_user_set_wins_and_gpus_are_left_alone():
    from training.host_memory import configure

    user = child("bounded", env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert user["done"] is None and user["kept"] < 16 << 20  # their 128 KiB threshold, not ours, returned it
    assert configure("bounded", on_cpu=False) is None


QLORA_CHILD = r"""
import json, sys
from kernel.models import resolve_base_model
from training import peft_setup
from training.config import load_config

if sys.argv[1] == "keep":  # what loading did before: the unquantized weights stay views of the file
    peft_setup.own_unquantized_weights = lambda model: None
cfg = load_config(None, ["train_file=examples/data/sales_chat.jsonl", "method=qlora", "task=t"])
base = resolve_base_model(cfg.base_model, log=lambda m: None)
model = peft_setup.load_base(cfg, base)
mapped = [line.split()[-1] for line in open("/proc/self/maps") if line.rstrip().endswith(".safetensors")]
out = model(input_ids=__import__("torch").tensor([[1, 2, 3]])).logits
print(json.dumps({"mapped": sorted(set(mapped)), "finite": bool(out.isfinite().all())}))
"""


def test_qlora_on_cpu_lets_the_checkpoint_mapping_go():
    def run(mode):
        proc = run_cli("-c", QLORA_CHILD, mode, timeout=300, env={"HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    kept, owned = run("keep"), run("own")
    assert any(p.endswith("model.safetensors") for p in kept["mapped"])  # the fp32 file, 0.5 GiB, still mapped
    assert owned["mapped"] == [] and owned["finite"]
