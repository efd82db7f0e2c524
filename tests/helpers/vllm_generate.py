"""Greedy replies from real vLLM for a base model with and without a LoRA adapter, as JSON on stdout.

Run as a script (vLLM spawns its engine process, which needs a __main__ guard), the way serving
will: prompt format and stop tokens come from the adapter's guardtune.json.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1" if (os.cpu_count() or 1) >= 2 else "0")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

if __name__ == "__main__":
    base_dir, adapter_dir, question = sys.argv[1:4]
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    manifest = json.load(open(os.path.join(adapter_dir, "guardtune.json")))
    llm = LLM(model=base_dir, dtype="float32", enable_lora=True, max_lora_rank=manifest["rank"],
              max_model_len=512, max_num_seqs=2, seed=0)
    params = SamplingParams(max_tokens=24, temperature=0, stop=manifest["stop_tokens"])
    msgs = [{"role": "user", "content": question}]
    kw = dict(chat_template=manifest["chat_template"], use_tqdm=False)
    base = llm.chat(msgs, params, **kw)[0].outputs[0]
    tuned = llm.chat(msgs, params, lora_request=LoRARequest("t", 1, adapter_dir), **kw)[0].outputs[0]
    print("RESULT " + json.dumps({"base": base.text, "adapter": tuned.text,
                                  "finish": [base.finish_reason, tuned.finish_reason]}))
