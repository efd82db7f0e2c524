"""Greedy replies from real vLLM for the base model and two LoRA adapters, as JSON on stdout.

Run as a script (vLLM's engine process needs a __main__ guard). The order is: base on a fresh engine,
each adapter, then all three in one batch, then base again once both LoRA slots hold an adapter.
GUARDTUNE_LORA_CPU in the environment decides whether the guardtune plugin (loaded through its vLLM
entry point, as in a server) acts.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1" if (os.cpu_count() or 1) >= 2 else "0")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# The engine core in this process: with its own process it may start a step before the mixed batch's
# other requests arrive, and a base row prefilled alone never meets vLLM's last-slot routing.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

if __name__ == "__main__":
    base_dir, *adapter_dirs = sys.argv[1:]
    question = "What are your opening hours?"
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    manifest = json.load(open(os.path.join(adapter_dirs[0], "guardtune.json")))
    llm = LLM(model=base_dir, dtype="float32", enable_lora=True, max_loras=len(adapter_dirs),
              max_lora_rank=manifest["rank"], max_model_len=512, max_num_seqs=4, seed=0)
    params = SamplingParams(max_tokens=24, temperature=0, stop=manifest["stop_tokens"])
    msgs = [{"role": "user", "content": question}]
    kw = dict(chat_template=manifest["chat_template"], use_tqdm=False)
    loras = [LoRARequest(f"a{i}", i + 1, d) for i, d in enumerate(adapter_dirs)]

    def ask(lora_list):
        outs = llm.chat([msgs] * len(lora_list), params, lora_request=lora_list, **kw)
        return [o.outputs[0].text for o in outs]

    result = {"base_fresh": ask([None])[0]}
    result["adapters"] = [ask([lr])[0] for lr in loras]
    result["mixed_batch"] = ask([None, *loras])
    result["base_slots_full"] = ask([None])[0]
    print("RESULT " + json.dumps(result))
