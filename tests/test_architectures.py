"""The architectures people fine-tune, built tiny from config (issue 15): the whole pipeline
(SFT, reward model, PPO with the fuse, DPO, eval) on Llama, Qwen2 (grouped-query attention),
Mistral, Gemma and GPT-NeoX; KV-cache generation equal to no-cache generation; left-padded
batched generation equal to one prompt at a time; tied and untied embeddings saved and loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cliprail.cli import main
from cliprail.rlhf.data import encode_prompts
from cliprail.rlhf.generation import generate
from cliprail.rlhf.models import load_causal_lm, load_tokenizer

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256)  # fmt: skip
ARCHS = {
    "llama": ("LlamaConfig", {**SMALL, "num_key_value_heads": 4}),
    "qwen2": ("Qwen2Config", {**SMALL, "num_key_value_heads": 2}),  # grouped-query attention
    "mistral": ("MistralConfig", {**SMALL, "num_key_value_heads": 2, "sliding_window": None}),
    "gemma": ("GemmaConfig", {**SMALL, "num_key_value_heads": 1, "head_dim": 8}),
    "gpt_neox": ("GPTNeoXConfig", {"hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "max_position_embeddings": 256, "use_parallel_residual": True}),
}  # fmt: skip


def _build(arch: str, tok, tie: bool | None = None, seed: int = 0) -> torch.nn.Module:
    cls_name, kw = ARCHS[arch]
    config = getattr(transformers, cls_name)(
        vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **kw,
        **({} if tie is None else {"tie_word_embeddings": tie}),
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def tok(pipeline):
    return load_tokenizer(pipeline / "sft" / "model")


@pytest.fixture(scope="module")
def prompts(pipeline):
    rows = [json.loads(x) for x in (pipeline / "data" / "prompts.jsonl").read_text().splitlines()]
    return [r["prompt"] for r in rows[:4]]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_generation_cache_and_left_padding(arch, tok, prompts):
    lm = _build(arch, tok)
    q, m = encode_prompts(tok, prompts, 128)
    kw = dict(max_new_tokens=8, eos_token_id=-1, pad_token_id=tok.pad_token_id, temperature=0.0)
    cached, _ = generate(lm, q, m, use_cache=True, **kw)
    plain, _ = generate(lm, q, m, use_cache=False, **kw)
    assert torch.equal(cached, plain)
    for i, p in enumerate(prompts):  # one prompt at a time, no padding at all
        qi, mi = encode_prompts(tok, [p], 128)
        alone, _ = generate(lm, qi, mi, use_cache=True, **kw)
        assert torch.equal(alone[0], cached[i]), (arch, i)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_tied_and_untied_embeddings_round_trip(arch, tie, tok, tmp_path):
    lm = _build(arch, tok, tie=tie)
    out_emb, in_emb = lm.get_output_embeddings().weight, lm.get_input_embeddings().weight
    assert (out_emb.data_ptr() == in_emb.data_ptr()) == tie
    lm.save_pretrained(str(tmp_path / "m"))
    tok.save_pretrained(str(tmp_path / "m"))
    back = load_causal_lm(tmp_path / "m").eval()
    assert (
        back.get_output_embeddings().weight.data_ptr()
        == back.get_input_embeddings().weight.data_ptr()
    ) == tie
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(back(input_ids=ids).logits, lm(input_ids=ids).logits)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_pipeline_runs_on_each_architecture(arch, tok, pipeline, tmp_path, capsys):
    base = tmp_path / "base"
    _build(arch, tok).save_pretrained(str(base))
    tok.save_pretrained(str(base))
    data = pipeline / "data"
    sft, rm = tmp_path / "sft", tmp_path / "rm"
    assert main(["rlhf", "sft", "--data", str(data / "demonstrations.jsonl"), "--model",
                 str(base), "--run-dir", str(sft), "--epochs", "1", "--batch-size", "32",
                 "--no-progress"]) == 0  # fmt: skip
    assert main(["rlhf", "reward", "--data", str(data / "preferences.jsonl"), "--sft-model",
                 str(sft / "model"), "--run-dir", str(rm), "--epochs", "1",
                 "--no-progress"]) == 0  # fmt: skip
    ppo = tmp_path / "ppo"
    assert main(["rlhf", "ppo", "--prompts", str(data / "prompts.jsonl"), "--sft-model",
                 str(sft / "model"), "--reward-model", str(rm / "model"), "--run-dir", str(ppo),
                 "--total-episodes", "16", "--batch-size", "8", "--minibatch-size", "8",
                 "--epochs", "1", "--max-new-tokens", "8", "--eval-every", "2",
                 "--eval-prompts", "4", "--no-progress"]) == 0  # fmt: skip
    assert main(["rlhf", "dpo", "--data", str(data / "preferences.jsonl"), "--sft-model",
                 str(sft / "model"), "--run-dir", str(tmp_path / "dpo"), "--epochs", "1",
                 "--batch-size", "32", "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["rlhf", "eval", "--run-dir", str(ppo), "--n-prompts", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_prompts"] == 4 and 0.0 <= res["ppo"]["gold"] <= 1.0
    saved = json.loads((Path(ppo) / "best" / "config.json").read_text())
    assert saved["model_type"] == arch
