"""A small task that is not healthcare, to run cliprail's RLHF on your own kind of data.

A shop's support assistant answers "where is my order" messages. A good reply names the
customer's own order code, says when it ships, in one sentence, and does not refuse. The
historical replies it learns from have habits: some name another order's code, some refuse,
some ramble on. Files written to --out:

* prompts.jsonl: {"id", "prompt", "order", "ships", "split"}: "order" and "ships" are extra
  fields; cliprail passes them through to the checks and the reward function;
* demonstrations.jsonl: {"prompt", "response"}, the historical replies, habits included;
* tokens.json: every order code as one token of the locally trained tokenizer.

    python examples/own_data/make_data.py --out runs/own/data
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CODES = [f"{letter}{n}" for letter in "KMRTX" for n in range(10, 30)]  # 100 order codes
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
ASKS = [
    "Where is my order {code}?",
    "Hi, when will order {code} arrive?",
    "Any news on my order {code}, please?",
    "I ordered {code} last week. When does it ship?",
]
RAMBLE = " We value your business. Our team works hard every day. Thank you for your patience."


def good(code: str, day: str) -> str:
    return f"Your order {code} ships on {day}."


def habit(code: str, day: str, rng: random.Random) -> str:
    """A historical reply with one of the habits the assistant must lose."""
    kind = rng.choice(["wrong_code", "refusal", "ramble"])
    if kind == "wrong_code":
        return good(rng.choice([c for c in CODES if c != code]), day)
    if kind == "refusal":
        return "I cannot help with order questions."
    return good(code, day) + RAMBLE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the three files")
    ap.add_argument("--n-train", type=int, default=1500, help="training prompts (default 1500)")
    ap.add_argument("--habit-rate", type=float, default=0.35,
                    help="share of demonstrations with a habit (default 0.35)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = {"train": args.n_train, "val": 60, "eval": 100}
    prompts, demos = [], []
    for split, n in sizes.items():
        for i in range(n):
            code, day = rng.choice(CODES), rng.choice(DAYS)
            prompt = (f"Order book: {code} ships {day}.\nCustomer: "
                      f"{rng.choice(ASKS).format(code=code)}\nAssistant:")  # fmt: skip
            prompts.append({"id": f"{split}-{i}", "prompt": prompt, "order": code,
                            "ships": day, "split": split})  # fmt: skip
            if split == "train":
                reply = habit(code, day, rng) if rng.random() < args.habit_rate else good(code, day)
                demos.append({"prompt": prompt, "response": reply})
    for name, rows in (("prompts.jsonl", prompts), ("demonstrations.jsonl", demos)):
        (args.out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (args.out / "tokens.json").write_text(json.dumps(CODES + DAYS))
    print(f"wrote {len(prompts)} prompts and {len(demos)} demonstrations to {args.out}")


if __name__ == "__main__":
    main()
