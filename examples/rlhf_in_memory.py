"""RLHF on models held in memory, with the Python API: no folders to prepare, no CLI.

A tiny Llama built from a config (any ``AutoModelForCausalLM`` works the same way) learns to
answer "Say <colour>." with the colour: SFT on a few demonstrations, then GRPO against a rule
reward written as a Python function, with the safety fuse judging by checks written the same
way. Reads top to bottom; runs in under a minute on a laptop CPU.

    python examples/rlhf_in_memory.py [--out runs/in-memory]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cliprail.rlhf import api
from cliprail.rlhf.models import train_tokenizer

COLOURS = ["red", "blue", "green", "gold", "grey", "pink", "teal", "navy"]


def reward(prompts: list[str], responses: list[str], records: list[dict]) -> list[float]:
    """+1 when the reply is the colour asked for, -1 otherwise (a verifiable reward)."""
    return [1.0 if r.strip().rstrip(".") == rec["colour"] else -1.0
            for r, rec in zip(responses, records, strict=True)]  # fmt: skip


def checks(prompts: list[str], responses: list[str], records: list[dict]) -> dict[str, list[float]]:
    """What the fuse watches, outside the reward: the right colour, and a one-word reply."""
    right = [float(rec["colour"] in r) for r, rec in zip(responses, records, strict=True)]
    short = [float(len(r.split()) == 1) for r in responses]
    return {"right_colour": right, "one_word": short,
            "score": [a * b for a, b in zip(right, short, strict=True)]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/in-memory"), help="run folders")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    # 1. a tokenizer and a tiny Llama, in memory
    prompts = [f"Say {c}." for c in COLOURS]
    tok = train_tokenizer(prompts + [f" {c}." for c in COLOURS], vocab_size=200)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    policy = LlamaForCausalLM(config)

    # 2. SFT on demonstrations, a quarter of them with the wrong colour (the habit to lose)
    demos = [(f"Say {c}.", COLOURS[(i + (k % 4 == 0)) % len(COLOURS)] + ".")
             for k in range(12) for i, c in enumerate(COLOURS)]  # fmt: skip
    api.sft(policy, tok, demos, run_dir=args.out / "sft", epochs=40, learning_rate=1e-2,
            progress=False)  # fmt: skip

    # 3. GRPO against the rule reward; the fuse keeps the best policy by the checks' score
    rows = [{"prompt": f"Say {c}.", "colour": c} for c in COLOURS] * 8
    result = api.ppo(policy, tok, rows, run_dir=args.out / "ppo", reward_fn=reward,
                     checks=checks, advantage="grpo", group_size=4, total_episodes=512,
                     batch_size=32, minibatch_size=16, max_new_tokens=8, kl_coef=0.05,
                     learning_rate=1e-3, eval_prompts=8, progress=False)  # fmt: skip
    first, best = result.fuse["evals"][0], result.fuse["best_gold"]
    print(
        f"checks' score {first['score']:.2f} before PPO, {best:.2f} at the kept update "
        f"{result.fuse['best_update']} (KL {result.fuse['evals'][-1]['kl_ref']:.2f} nats); "
        f"run folder {result.run_dir}"
    )


if __name__ == "__main__":
    main()
