"""The RLHF stages as Python functions, for models and data held in memory.

The command line reads folders and files; a notebook or a larger program already holds a
``PreTrainedModel``, its tokenizer, a list of prompts and its own Python functions. These
functions run the same stages (the same loops, fuse, checkpoints and run folder) on them::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from cliprail.rlhf import api

    policy = AutoModelForCausalLM.from_pretrained("my-model")
    tok = AutoTokenizer.from_pretrained("my-model")
    api.sft(policy, tok, [{"prompt": "Hi", "response": "Hello."}], run_dir="runs/sft")
    result = api.ppo(policy, tok, ["Say hello."], run_dir="runs/ppo",
                     reward_fn=lambda prompts, responses, records: [...],
                     checks=my_checks, advantage="grpo", group_size=4)

Models are trained in place (the policy object you passed is the trained policy). Keyword
options are the CLI's flags as config fields (``SFTConfig``, ``PPOConfig``: ``--group-size``
is ``group_size``). The run folder holds what the CLI's does (metrics, checkpoints, the fuse's
history and best checkpoint, report pictures); ``config.json`` names the in-memory objects as
``<in memory>``. ``examples/rlhf_in_memory.py`` runs SFT and PPO end to end; the tests run
the reward model and DPO too.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cliprail.rlhf.checks import Checks, RewardFn
from cliprail.rlhf.data import DataError
from cliprail.rlhf.models import ScalarHeadModel, check_vocab
from cliprail.rlhf.records import PromptRecord, _chat_pair, records_from
from cliprail.rlhf.sampling import Rewarder

IN_MEMORY = Path("<in memory>")


@dataclass
class PPOResult:
    """What :func:`ppo` returns."""

    policy: Any
    """The trained policy (the object passed in, trained in place; the best checkpoint the fuse
    kept is in ``run_dir/best``)."""
    fuse: dict[str, Any]
    """The fuse's summary: history of evaluations, kept update, verdict (``fuse.json``)."""
    run_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)


def _demos(items: Sequence[Mapping[str, Any] | tuple[str, str]], tokenizer: Any) -> list[dict]:
    out = []
    for n, it in enumerate(items, start=1):
        where = f"demonstration {n}"
        prompt: Any
        response: Any
        if isinstance(it, tuple):
            prompt, response = it
        elif "messages" in it and "prompt" not in it:
            prompt, response = _chat_pair(it["messages"], where, tokenizer)
        else:
            prompt, response = it.get("prompt"), it.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
            raise DataError(f"{where}: needs a 'prompt' and a non-empty 'response' string")
        out.append({"prompt": prompt, "response": response})
    if not out:
        raise DataError("no demonstrations given")
    return out


def sft(
    model: Any,
    tokenizer: Any,
    demonstrations: Sequence[Mapping[str, Any] | tuple[str, str]],
    *,
    run_dir: str | Path,
    **options: Any,
) -> Path:
    """Supervised fine-tuning of ``model`` (in place) on ``demonstrations``: dicts
    ``{"prompt", "response"}``, ``(prompt, response)`` tuples or chat records ``{"messages"}``.
    ``options``: :class:`cliprail.rlhf.sft.SFTConfig` fields. Returns the saved model folder."""
    from cliprail.rlhf.parallel import DataParallel
    from cliprail.rlhf.sft import SFTConfig, _train_sft

    cfg = SFTConfig(data=IN_MEMORY, run_dir=Path(run_dir), model=IN_MEMORY, **options)
    demos = _demos(demonstrations, tokenizer)
    check_vocab(tokenizer, model, "the model given")
    dp = DataParallel.from_env(cfg.device, fsdp=cfg.fsdp)
    try:
        return _train_sft(cfg, demos, dp, given=(model, tokenizer))
    finally:
        dp.close()


def _pairs(items: Sequence[Mapping[str, Any]], tokenizer: Any) -> list[dict[str, Any]]:
    """Preference pairs from memory, plain or chat (as :func:`load_preference_pairs` reads)."""
    import json
    import tempfile

    from cliprail.rlhf.records import load_preference_pairs

    if not items:
        raise DataError("no preference pairs given")
    with tempfile.TemporaryDirectory() as tmp:  # one reader, one set of checks and errors
        f = Path(tmp) / "pairs.jsonl"
        f.write_text("".join(json.dumps(dict(x)) + "\n" for x in items))
        return load_preference_pairs(f, tokenizer)


def reward_model(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[Mapping[str, Any]],
    *,
    run_dir: str | Path,
    **options: Any,
) -> ScalarHeadModel:
    """A reward model trained on preference ``pairs`` (``{"prompt", "chosen", "rejected"}`` or
    chat pairs), its trunk the causal LM ``model`` (trained in place: pass a copy to keep it).
    ``options``: :class:`cliprail.rlhf.reward.RewardConfig` fields. Returns the reward model,
    ready for :func:`ppo` (its folder is ``run_dir/model``)."""
    from cliprail.rlhf.parallel import DataParallel
    from cliprail.rlhf.reward import RewardConfig, _train_reward

    cfg = RewardConfig(data=IN_MEMORY, sft_model=IN_MEMORY, run_dir=Path(run_dir), **options)
    data = _pairs(pairs, tokenizer)
    dp = DataParallel.from_env(cfg.device, fsdp=cfg.fsdp)
    try:
        _train_reward(cfg, data, dp, given=(model, tokenizer))
    finally:
        dp.close()
    return ScalarHeadModel.load(Path(run_dir) / "model")


def dpo(
    policy: Any,
    tokenizer: Any,
    pairs: Sequence[Mapping[str, Any]],
    *,
    run_dir: str | Path,
    **options: Any,
) -> dict[str, Any]:
    """DPO (or IPO, ``loss_type="ipo"``) of ``policy`` in place on preference ``pairs``,
    anchored to a frozen copy of it. ``options``: :class:`cliprail.rlhf.dpo.DPOConfig` fields.
    Returns the run's metrics (``dpo_metrics.json``)."""
    from cliprail.rlhf.dpo import DPOConfig, _train_dpo
    from cliprail.rlhf.parallel import DataParallel

    cfg = DPOConfig(data=IN_MEMORY, sft_model=IN_MEMORY, run_dir=Path(run_dir), **options)
    data = _pairs(pairs, tokenizer)
    dp = DataParallel.from_env(cfg.device, fsdp=cfg.fsdp)
    try:
        return _train_dpo(cfg, data, [], dp, given=(policy, tokenizer))
    finally:
        dp.close()


def ppo(
    policy: Any,
    tokenizer: Any,
    prompts: Sequence[str | Mapping[str, Any]],
    *,
    run_dir: str | Path,
    reward_model: ScalarHeadModel | None = None,
    reward_fn: RewardFn | None = None,
    checks: Checks | str | None = "auto",
    reference: Any = None,
    reward_shift: float = 0.0,
    **options: Any,
) -> PPOResult:
    """RLHF with PPO (or its critic-free forms) on models held in memory.

    Args:
        policy: the causal LM to train, in place (its frozen copy is the reference unless
            ``reference`` is given).
        tokenizer: its tokenizer (a pad token is needed: left-padded batches).
        prompts: strings, or dicts in any record form of ``--prompts`` (``prompt`` with extra
            fields, which reach ``reward_fn`` and ``checks``; ``messages``; ``split``). With no
            split, the first 10% are the fuse's ``val`` prompts.
        reward_model: a :class:`~cliprail.rlhf.models.ScalarHeadModel` (frozen here), minus
            ``reward_shift``; and/or
        reward_fn: ``fn(prompts, responses, records) -> [float per response]``.
        checks: ``fn(prompts, responses, records) -> {name: [value in [0, 1]]}``, ``"auto"``
            (the healthcare judge for healthcare prompts, else the generic checks), ``"generic"``
            or None (the fuse watches KL alone).
        options: :class:`cliprail.rlhf.ppo.PPOConfig` fields (``advantage``, ``group_size``,
            ``kl_coef``, ``total_episodes``, ...); ``reward_model_weight`` and
            ``reward_fn_weight`` weigh a sum of both rewards.
    """
    from cliprail.rlhf.checks import generic_checks
    from cliprail.rlhf.ppo import Models, PPOConfig, train_ppo

    if reward_model is None and reward_fn is None:
        raise ValueError("give reward_model, reward_fn, or both")
    cfg = PPOConfig(
        prompts=IN_MEMORY,
        sft_model=IN_MEMORY,
        run_dir=Path(run_dir),
        reward_model=IN_MEMORY if reward_model is not None else None,
        reward_fn=f"<in memory: {getattr(reward_fn, '__name__', 'reward_fn')}>"
        if reward_fn is not None
        else None,
        checks=checks if isinstance(checks, str) else "custom" if checks else "none",
        **options,
    )
    check_vocab(tokenizer, policy, "the policy given")
    ref = reference if reference is not None else copy.deepcopy(policy)
    ref.requires_grad_(False)
    reward = reward_model.requires_grad_(False) if reward_model is not None else None
    value = None
    if cfg.uses_critic:  # from the reward model (Huang et al. 2024), else from the policy's trunk
        value = (
            copy.deepcopy(reward_model)
            if reward_model is not None
            else ScalarHeadModel.from_causal_lm(copy.deepcopy(policy))
        ).requires_grad_(True)
    for module in (policy, ref, reward, value):
        if module is not None:
            module.eval()  # dropout off in every model (Huang et al. 2024)
    resolved: Checks | str | None = checks
    if checks == "generic":
        resolved = generic_checks()
    rewarder = Rewarder(
        reward, reward_shift, reward_fn, cfg.reward_model_weight, cfg.reward_fn_weight
    )
    models = Models(tokenizer, policy, ref, value, reward, reward_shift, rewarder, resolved)
    records: list[PromptRecord] = records_from(prompts, tokenizer)
    fuse = train_ppo(cfg, models=models, records=records)
    return PPOResult(policy, fuse, Path(run_dir))


__all__ = ["IN_MEMORY", "PPOResult", "dpo", "ppo", "reward_model", "sft"]
