"""Every training method on the real SmolLM2: it trains, its artifact reloads through the path serving
and eval use, it changes greedy replies, and serving accepts or refuses it with a clear message."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from kernel.errors import GuardtuneError
from kernel.manifest import Manifest
from tests.conftest import Server, tiny_config
from training.config import validate
from training.entry import train

QUESTION = [{"role": "user", "content": "Can you tell me about your company?"}]  # not in the training data

# Per-method settings for a short run on batch 2. Prompt methods train a few thousand to a few hundred
# thousand parameters from scratch, so they need far higher learning rates than weight updates, and more
# steps. qlora and dora are left to tests/test_train.py (their loader and serving path are lora's; DoRA
# alone costs 2.5x a LoRA run here).
METHODS = {
    "lora": dict(max_steps=6),
    "full": dict(learning_rate=1e-4, max_steps=6),
    "freeze": dict(trainable_layers=2, trainable_modules=["model.norm"], learning_rate=1e-3, max_steps=6,
                   save_steps=3),  # checkpoints of a full model, for the resume test
    "prompt_tuning": dict(num_virtual_tokens=8, prompt_init_text="Kestrel Home Solar sales assistant",
                          learning_rate=1e-2),
    # checkpointing on: p_tuning really uses it; prefix_tuning must run without it (its prefixes are the KV
    # cache, which checkpointed layers drop), so the trainer turns it off there.
    "p_tuning": dict(num_virtual_tokens=8, encoder_hidden_size=128, learning_rate=2e-3, gradient_checkpointing=True),
    "prefix_tuning": dict(num_virtual_tokens=8, learning_rate=1e-2, gradient_checkpointing=True),
    "llama_adapter": dict(num_virtual_tokens=8, learning_rate=1e-2),
}
SEEN: dict[str, dict] = {}  # per-method figures, written to the test artifacts for the record


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """method -> (config, artifact dir), trained once on first use and shared by the tests below."""
    tmp = tmp_path_factory.mktemp("methods")
    cache: dict[str, tuple] = {}

    def get(method: str):
        if method not in cache:
            over = {"max_steps": 8, "save_steps": 100, **METHODS[method]}
            cfg = validate(tiny_config(tmp, tiny_data, task=method, method=method, batch_size=2, eval_split=0.0,
                                       output_dir=str(tmp / "adapters" / method),
                                       run_dir=str(tmp / "runs" / method), **over))
            cache[method] = (cfg, train(cfg, log=lambda m: None))
        return cache[method]

    yield get
    out = Path(__file__).parent / "artifacts" / "methods.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(SEEN, indent=2) + "\n")


def step_losses(cfg) -> list[float]:
    rows = [json.loads(line) for line in (cfg.checkpoint_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_reloads_and_changes_replies(method, trained, tiny_data):
    from training.adapters import load_adapter
    from training.evaluate import evaluate
    from training.generate import compare

    cfg, artifact = trained(method)
    losses = step_losses(cfg)
    assert len(losses) == cfg.max_steps
    # Batches alternate short and multi-turn chats, so single step losses jump; compare halves of the run,
    # then the artifact's loss on the training chats against the base's (deterministic), as `guardtune eval`.
    half = cfg.max_steps // 2
    assert sum(losses[half:]) < sum(losses[:half]), losses
    report = evaluate(artifact, tiny_data, samples=0, gen_rows=0, log=lambda m: None)
    assert report["loss"] < report["base_loss"], report

    manifest, tok, model = load_adapter(artifact)  # the loader eval and export use
    assert manifest.method == method and manifest.metrics.trainable_params > 0
    [(_, base, tuned)] = compare(model, tok, [QUESTION], stop_ids=tok.convert_tokens_to_ids(manifest.stop_tokens),
                                 max_new_tokens=8)
    SEEN[method] = dict(trainable_params=manifest.metrics.trainable_params, step_losses=[round(x, 3) for x in losses],
                        eval_loss=round(report["loss"], 3), base_loss=round(report["base_loss"], 3),
                        base=base, tuned=tuned)
    assert tuned != base
    if method in ("lora", "full", "freeze"):
        assert "Kestrel" in tuned and "Kestrel" not in base


def test_artifact_kinds_in_manifest_and_on_disk(trained):
    expect = {"lora": ("adapter", "vllm"), "full": ("full_model", "vllm"),
              "prefix_tuning": ("adapter", "transformers"), "llama_adapter": ("adapter", "transformers")}
    for method, (artifact, serve_with) in expect.items():
        _, path = trained(method)
        m = Manifest.read(path)
        assert (m.artifact, m.serve_with) == (artifact, serve_with)
        assert (m.rank is not None) == (method == "lora")
    _, full = trained("full")
    files = {p.name for p in full.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    assert json.loads((full / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    # Servable as a base model: the resolver accepts it and the chat template travels with the tokenizer.
    from transformers import AutoTokenizer

    from kernel.models import resolve_base_model

    assert resolve_base_model(str(full)) == full
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(full).chat_template


def test_freeze_trains_only_the_named_parts(trained):
    from kernel.models import resolve_base_model
    from training import peft_setup

    cfg, _ = trained("freeze")
    model = peft_setup.load_base(cfg, resolve_base_model(cfg.base_model))
    model, trainable, total = peft_setup.wrap(cfg, model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[2] for n in names if n.startswith("model.layers.")} == {"28", "29"}
    assert "model.norm.weight" in names and "model.embed_tokens.weight" not in names
    assert 0 < trainable < total / 10
    with pytest.raises(GuardtuneError, match="trainable_layers 31 is more than the 30 layers"):
        peft_setup.wrap(cfg.model_copy(update={"trainable_layers": 31}), model)
    with pytest.raises(GuardtuneError, match="no module 'model.nrom' \\(did you mean 'model.norm'\\?\\)"):
        peft_setup.wrap(cfg.model_copy(update={"trainable_modules": ["model.nrom"]}), model)


def test_resume_continues_from_a_full_model_checkpoint(trained, tmp_path):
    from training.checkpoints import latest_checkpoint

    cfg, _ = trained("freeze")
    ckpt = latest_checkpoint(cfg.checkpoint_dir)
    assert ckpt.name == "checkpoint-6" and (ckpt / "model.safetensors").is_file()
    assert not any(ckpt.glob("adapter_model.*"))
    logs: list[str] = []
    raw = cfg.model_dump(mode="json", exclude_unset=True)
    longer = validate({**raw, "max_steps": 8, "output_dir": str(tmp_path / "freeze")})
    out = train(longer, log=logs.append)
    assert any(line.startswith("resume: continuing from") and line.endswith("checkpoint-6") for line in logs), logs
    assert [m["step"] for m in map(json.loads, (cfg.checkpoint_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in m][-2:] == [7, 8]
    assert Manifest.read(out).metrics.steps == 8


def test_p_tuning_lstm_encoder_builds(tmp_path, tiny_data):
    from kernel.models import resolve_base_model
    from training import peft_setup

    cfg = validate(tiny_config(tmp_path, tiny_data, method="p_tuning", p_tuning_encoder="lstm",
                               encoder_hidden_size=64))
    model, trainable, _ = peft_setup.wrap(cfg, peft_setup.load_base(cfg, resolve_base_model(cfg.base_model)))
    assert "LSTM" in {type(m).__name__ for m in model.modules()} and trainable > 0


@pytest.mark.parametrize("over, message", [
    (dict(method="full", quantization="nf4"), "quantization nf4 is only used with method qlora, not full"),
    (dict(method="full", merge=True), "merge only folds LoRA-family adapters (lora, dora) into the base; "
                                      "method full already writes a full model"),
    (dict(method="prefix_tuning", merge=True), "method prefix_tuning has no weights to fold"),
    (dict(method="lora", trainable_layers=2), "trainable_layers only applies to method freeze, not lora"),
    (dict(method="freeze"), "method freeze needs what to train"),
    (dict(method="lora", num_virtual_tokens=8), "num_virtual_tokens only applies to method prompt_tuning"),
    (dict(method="p_tuning", prompt_init_text="hi"), "prompt_init_text only applies to method prompt_tuning"),
    (dict(method="prefix_tuning", encoder_hidden_size=64), "encoder_hidden_size only applies to prefix_tuning "
                                                           "with prefix_projection: true"),
    (dict(method="p_tuning", p_tuning_encoder="gru"), "'p_tuning_encoder': Input should be 'mlp' or 'lstm'"),
    (dict(method="bitfit"), "'method': Input should be"),
])
def test_config_refuses_method_mistakes_in_one_line(over, message, tmp_path, tiny_data):
    with pytest.raises(GuardtuneError) as err:
        validate(tiny_config(tmp_path, tiny_data, **over))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_prompt_methods_accept_ignored_lora_keys(tmp_path, tiny_data):
    cfg = validate(tiny_config(tmp_path, tiny_data, method="prompt_tuning", rank=4, alpha=8))
    assert cfg.method == "prompt_tuning"


def test_export_merge_refuses_non_lora(trained, tmp_path):
    from tests.conftest import run_cli

    for method, hint in (("prefix_tuning", "serve it with `engine: transformers`"),
                         ("full", "is already a full model")):
        _, path = trained(method)
        proc = run_cli("-m", "guardtune.cli", "export", str(path), "--merge", str(tmp_path / method))
        assert proc.returncode == 2 and hint in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert not (tmp_path / method).exists()


def test_old_manifest_without_artifact_keys_still_reads(trained, tmp_path):
    import shutil

    _, lora = trained("lora")
    old = shutil.copytree(lora, tmp_path / "old")
    raw = json.loads((old / "guardtune.json").read_text())
    for key in ("artifact", "serve_with"):
        raw.pop(key)
    (old / "guardtune.json").write_text(json.dumps(raw))
    m = Manifest.read(old)
    assert (m.artifact, m.serve_with, m.rank) == ("adapter", "vllm", 8)
    raw["method"] = "prefix_tuning"  # a hand-edit that contradicts what the directory holds
    (old / "guardtune.json").write_text(json.dumps(raw))
    with pytest.raises(GuardtuneError, match="can only be served by the transformers engine"):
        Manifest.read(old)


def registry(engine, root: Path, base_dir: Path):
    from kernel.models import weights_sha256
    from serving.registry import TaskRegistry

    return TaskRegistry(engine, base_sha256=weights_sha256(base_dir), adapters_root=root, max_lora_rank=16,
                        state_file=root / "state.json")


def test_vllm_registry_refuses_prompt_and_full_artifacts(trained, base_dir):
    from serving.engines.hf_engine import TransformersEngine
    from serving.engines.vllm_engine import VLLMEngine
    from serving.registry import AdapterRejected

    _, prefix = trained("prefix_tuning")
    _, full = trained("full")
    _, lora = trained("lora")
    root = prefix.parent
    vllm = registry(VLLMEngine(None, base_dir), root, base_dir)  # constructed, never started
    with pytest.raises(AdapterRejected) as err:
        vllm.validate(prefix)
    assert err.value.status == 409 and "cannot be served by vLLM" in str(err.value)
    assert "set `engine: transformers` in the serve config" in str(err.value)
    for reg in (vllm, registry(TransformersEngine(None, base_dir), root, base_dir)):
        with pytest.raises(AdapterRejected) as err:
            reg.validate(full)
        assert err.value.status == 409 and "is a full model (full fine-tune), not an adapter" in str(err.value)
        assert f"`base_model: {full.resolve()}`" in str(err.value)
        assert reg.validate(lora)[1].method == "lora"
    assert registry(TransformersEngine(None, base_dir), root, base_dir).validate(prefix)[1].method == "prefix_tuning"


def test_transformers_engine_decodes_prompt_methods_like_peft_generate(trained, base_dir):
    """The engine's step-by-step KV-cache loop must reproduce PeftModel.generate for every PEFT kind,
    with a LoRA adapter loaded on the shared base at the same time."""
    from serving.engines.base import AdapterRef, GenParams
    from serving.engines.hf_engine import TransformersEngine
    from training.adapters import load_adapter
    from training.decode import reply

    methods = ["lora", "prompt_tuning", "p_tuning", "prefix_tuning", "llama_adapter"]  # LoRA injected first
    expected = {}
    for method in methods:
        manifest, tok, model = load_adapter(trained(method)[1])
        stop_ids = tok.convert_tokens_to_ids(manifest.stop_tokens)
        expected[method] = reply(model, tok, QUESTION, stop_ids=stop_ids, max_new_tokens=8)
    prompt_ids = tok(tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
    params = GenParams(max_tokens=8, temperature=0, stop_token_ids=stop_ids)

    async def run():
        engine = TransformersEngine(None, base_dir)
        await engine.start()
        refs = {m: AdapterRef(m, i, str(trained(m)[1])) for i, m in enumerate(methods, start=1)}
        for ref in refs.values():
            await engine.load_adapter(ref)
        got = {}
        for m in [*methods, None]:
            text = ""
            async for d in engine.generate(f"r-{m}", prompt_ids, params, refs.get(m)):
                text += d.text
            got[m] = text.strip()
        await engine.unload_adapter(refs["prefix_tuning"])
        return got, set(engine.prompt_models)

    got, left = asyncio.run(run())
    assert {m: got[m] for m in methods} == expected
    assert got[None] not in {got[m] for m in methods}  # the base request ran with every adapter off
    assert left == {2, 3, 5}


def test_transformers_engine_serves_prefix_and_prompt_tasks_over_http(trained, tmp_path):
    import openai

    from training.adapters import load_adapter
    from training.decode import reply

    tasks = {m: str(trained(m)[1]) for m in ("prefix_tuning", "prompt_tuning")}
    srv = Server({"engine": "transformers", "adapters_root": str(Path(tasks["prefix_tuning"]).parent),
                  "tasks": tasks, "state_file": str(tmp_path / "state.json"), "limits": {"max_tokens_cap": 16}},
                 tmp_path)
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
        for task, path in tasks.items():
            manifest, tok, model = load_adapter(path)
            stop_ids = tok.convert_tokens_to_ids(manifest.stop_tokens)
            r = client.chat.completions.create(model=task, messages=QUESTION, max_tokens=8, temperature=0)
            assert r.choices[0].message.content.strip() == reply(model, tok, QUESTION, stop_ids=stop_ids,
                                                                 max_new_tokens=8)
        base = client.chat.completions.create(model="base", messages=QUESTION, max_tokens=8, temperature=0)
        assert base.choices[0].message.content != r.choices[0].message.content
    finally:
        srv.stop()
