"""``cliprail rlhf best-of-n``: sample n responses from the SFT model, keep the one the reward
model scores highest. No training; the cost is all sampling.

For each held-out prompt the stage draws ``max(n)`` candidates once; best-of-n for every
``n`` in ``--n`` uses the first n of them, so one run gives the whole curve. A separate pool of
``--pool`` reference samples per prompt estimates the KL of best-of-n to the reference
(:func:`cliprail.ppo.best_of_n_kl_estimate`), reported beside the analytic
``log n - (n - 1) / n``: with a small model many samples tie, and the real KL is lower.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cliprail.checkpoint import atomic_write_json
from cliprail.errors import ConfigError
from cliprail.monitor import Progress
from cliprail.ppo import best_of_n_kl, best_of_n_kl_estimate
from cliprail.resume import open_run, seed_everything
from cliprail.rlhf.common import Cost
from cliprail.rlhf.data import DataError
from cliprail.rlhf.models import ScalarHeadModel, check_vocab, load_causal_lm, load_tokenizer
from cliprail.rlhf.sampling import Sampling, load_requests, sample, score, summarize


@dataclass(frozen=True)
class BestOfNConfig:
    """Best-of-n sampling against the reward model on held-out prompts."""

    prompts: Path
    """prompts.jsonl (healthcare Request schema); the 'eval' split is used."""
    sft_model: Path
    """The SFT model folder: the sampler (and the reference)."""
    reward_model: Path
    """Reward model folder (from `cliprail rlhf reward`): picks the best candidate."""
    run_dir: Path
    """Run folder: bestofn.json (per n: gold, rates, proxy reward, KL) and stage.json."""
    n: tuple[int, ...] = (1, 2, 4, 8, 16)
    """Candidates per prompt; several values give several points of one curve."""
    pool: int = 32
    """Extra reference samples per prompt for the KL estimate (0: analytic KL only)."""
    eval_prompts: int = 120
    """Held-out prompts (the first of split 'eval')."""
    max_new_tokens: int = 48
    """Longest response."""
    temperature: float = 0.7
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling."""
    max_prompt_len: int = 128
    """Longest prompt in tokens; longer is an error."""
    batch_size: int = 64
    """Sequences per generation batch."""
    no_eos_penalty: float | None = -1.0
    """Score of a response that never emits EOS."""
    seed: int = 0
    """Seed of the sampling."""
    trust_remote_code: bool = False
    """Allow a model folder's own Python code to run."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if not self.n or min(self.n) < 1:
            raise ConfigError(f"--n must list integers >= 1, got {list(self.n)}")
        if self.pool < 0 or self.eval_prompts <= 0 or self.batch_size <= 0:
            raise ConfigError("--pool must be >= 0, --eval-prompts and --batch-size > 0")
        if self.temperature <= 0 or not 0.0 < self.top_p <= 1.0 or self.max_new_tokens <= 0:
            raise ConfigError("--temperature must be > 0, --top-p in (0, 1], --max-new-tokens > 0")

    def sampling(self) -> Sampling:
        return Sampling(
            self.max_new_tokens,
            self.temperature,
            self.top_p,
            self.max_prompt_len,
            self.batch_size,
            self.no_eos_penalty,
        )


def pick_best(scores: torch.Tensor, n: int) -> torch.Tensor:
    """``(P,)`` index of the highest score among the first ``n`` candidates of each prompt
    (``scores`` ``(P, N)``); the first one wins a tie."""
    return scores[:, :n].argmax(dim=1)


@torch.no_grad()
def _draw(
    policy: torch.nn.Module,
    tok: Any,
    reward: ScalarHeadModel,
    shift: float,
    prompts: list[str],
    k: int,
    cfg: BestOfNConfig,
    g: torch.Generator,
    cost: Cost,
    bar: Progress,
    done: list[int],
) -> tuple[list[list[str]], torch.Tensor, torch.Tensor]:
    """``k`` samples per prompt: texts ``[P][k]``, scores and lengths ``(P, k)``."""
    s = cfg.sampling()
    flat = [p for p in prompts for _ in range(k)]  # prompt-major: row i*k + j
    texts: list[str] = []
    scores, lengths = [], []
    for i in range(0, len(flat), cfg.batch_size):
        x = sample(policy, tok, flat[i : i + cfg.batch_size], s, g)
        scores.append(score(reward, shift, x, tok.eos_token_id, s))
        lengths.append(x.response_mask.sum(1).float())
        texts += x.texts
        cost.add(forward=2 * x.positions)  # generation + reward model
        done[0] += len(x.texts)
        bar.update(done[0])
    P = len(prompts)
    return (
        [texts[j * k : (j + 1) * k] for j in range(P)],
        torch.cat(scores).view(P, k),
        torch.cat(lengths).view(P, k),
    )


def run_best_of_n(cfg: BestOfNConfig) -> dict[str, Any]:
    """Sample, pick, judge; returns {"points": [per n], ...} (also <run_dir>/bestofn.json)."""
    requests = [r for r in load_requests(cfg.prompts) if r.split == "eval"][: cfg.eval_prompts]
    if not requests:
        raise DataError(f"{cfg.prompts}: no requests with split 'eval'")
    open_run(cfg.run_dir, cfg)
    t0 = time.perf_counter()
    g = seed_everything(cfg.seed)
    tok = load_tokenizer(cfg.sft_model, cfg.trust_remote_code)
    policy = load_causal_lm(cfg.sft_model, cfg.trust_remote_code).eval()
    check_vocab(tok, policy, str(cfg.sft_model))
    reward = ScalarHeadModel.load(cfg.reward_model, cfg.trust_remote_code).eval()
    shift = float(reward.meta(cfg.reward_model).get("shift", 0.0))
    cost = Cost("best-of-n")
    prompts = [r.prompt for r in requests]
    n_max = max(cfg.n)
    bar = Progress(len(prompts) * (n_max + cfg.pool), "best-of-n samples", cfg.progress)
    done = [0]
    cand_texts, cand_scores, cand_lengths = _draw(
        policy, tok, reward, shift, prompts, n_max, cfg, g, cost, bar, done
    )
    pool_scores = None
    if cfg.pool:
        _, pool_scores, _ = _draw(
            policy, tok, reward, shift, prompts, cfg.pool, cfg, g, cost, bar, done
        )
    bar.close()
    rows = torch.arange(len(prompts))
    points = []
    for n in sorted(set(cfg.n)):
        best = pick_best(cand_scores, n)  # (P,)
        chosen = cand_scores[rows, best]
        kl_est = (
            float(best_of_n_kl_estimate(chosen, pool_scores, n))
            if pool_scores is not None
            else float("nan")
        )
        texts = [cand_texts[i][int(best[i])] for i in range(len(prompts))]
        ev = summarize(
            requests,
            texts,
            chosen.tolist(),
            [kl_est] * len(prompts),
            cand_lengths[rows, best].tolist(),
        )
        ev.update(n=n, kl_analytic=best_of_n_kl(n), kl_estimate=kl_est)
        points.append(ev)
    cost.wall_s = time.perf_counter() - t0
    result = {
        "points": [{k: v for k, v in p.items() if k not in ("golds", "notes")} for p in points],
        "prompt_ids": [r.id for r in requests],
        "pool": cfg.pool,
        "golds": {str(p["n"]): p["golds"] for p in points},
    }
    cost.write(cfg.run_dir, n=sorted(set(cfg.n)))
    atomic_write_json(cfg.run_dir / "bestofn.json", result)
    return result


def kl_table(result: dict[str, Any]) -> str:
    """n, analytic and estimated KL, gold and proxy reward, one line per n."""
    lines = [f"{'n':>4s} {'KL analytic':>12s} {'KL estimate':>12s} {'gold':>7s} {'proxy':>7s}"]
    for p in result["points"]:
        lines.append(
            f"{p['n']:4d} {p['kl_analytic']:12.3f} {p['kl_estimate']:12.3f} "
            f"{p['gold']:7.3f} {p['proxy_reward']:7.3f}"
        )
    return "\n".join(lines)


def load_result(run_dir: Path) -> dict[str, Any]:
    f = run_dir / "bestofn.json"
    if not f.is_file():
        raise DataError(f"{run_dir}: not a best-of-n run folder (no bestofn.json)")
    return dict(json.loads(f.read_text()))
