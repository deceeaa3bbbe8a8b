"""LM plumbing: local tokenizer, KV-cache generation, log-probs, masks, scalar heads."""

from __future__ import annotations

import pytest
import torch

from cliprail.errors import CheckpointError
from cliprail.rlhf.data import encode_pairs, encode_prompts
from cliprail.rlhf.generation import generate, response_mask
from cliprail.rlhf.models import (
    ScalarHeadModel,
    last_token_index,
    load_causal_lm,
    load_tokenizer,
    logprobs_from_logits,
    position_ids_from_mask,
    response_logprobs,
    tiny_gpt2,
    token_logprobs,
    train_tokenizer,
)
from cliprail.scenarios.healthcare import make_requests
from cliprail.scenarios.healthcare.cards import good_card

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok():
    import random

    reqs = make_requests(200, seed=0)
    rng = random.Random(0)
    return train_tokenizer([r.prompt for r in reqs] + [good_card(r, rng) for r in reqs], 400)


@pytest.fixture(scope="module")
def lm(tok):
    return tiny_gpt2(len(tok), n_layer=2, n_embd=32, n_head=2).eval()


def test_tokenizer_round_trip_and_special_tokens(tok, tmp_path):
    text = "Calendar Dr. Ali (cardiology): Tue 3 Mar 14:00.\nPatient: Hi\nAssistant:"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(text) == tok.encode(text) and again.padding_side == "left"


def test_save_and_load_from_local_folder(lm, tmp_path):
    lm.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = load_causal_lm(tmp_path)
    x = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded(x).logits, lm(x).logits)
    with pytest.raises(CheckpointError, match="missing: model folder not found"):
        load_causal_lm(tmp_path / "missing")


def test_logprobs_equal_naive_gather():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    naive = torch.zeros(2, 5)
    for b in range(2):
        for t in range(5):
            naive[b, t] = torch.log(torch.softmax(logits[b, t], -1)[labels[b, t]])
    torch.testing.assert_close(logprobs_from_logits(logits, labels), naive)


def test_masks_and_positions():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]
    assert last_token_index(mask).tolist() == [4, 3]
    resp = torch.tensor([[5, 7, 0, 9], [5, 5, 5, 5], [0, 3, 0, 2]])
    assert response_mask(resp, eos_token_id=0).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1],
                                                              [1, 0, 0, 0]]  # fmt: skip


def test_kv_cache_greedy_equals_no_cache(tok, lm):
    prompts = [r.prompt for r in make_requests(3, seed=1)]
    q, m = encode_prompts(tok, prompts, 128)
    kw = dict(max_new_tokens=12, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
              temperature=0.0)  # fmt: skip
    with_cache, _ = generate(lm, q, m, use_cache=True, **kw)
    without, _ = generate(lm, q, m, use_cache=False, **kw)
    assert torch.equal(with_cache, without)


def _sampled(tok, lm, n: int, seed: int, new_tokens: int, temperature: float):
    """``n`` healthcare prompts (left-padded ids and mask) and responses sampled from ``lm``."""
    q, m = encode_prompts(tok, [r.prompt for r in make_requests(n, seed=seed)], 128)
    g = torch.Generator().manual_seed(seed)
    resp, rmask = generate(lm, q, m, max_new_tokens=new_tokens, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, temperature=temperature,
                           generator=g)  # fmt: skip
    return q, m, resp, rmask


def test_sampled_logprobs_match_training_forward(tok, lm):
    # The log-probs of sampled tokens recomputed in one padded forward are the sampling
    # distribution's: left padding and position ids agree between generation and training.
    q, m, resp, rmask = _sampled(tok, lm, n=4, seed=2, new_tokens=6, temperature=0.7)
    ids = torch.cat([q, resp], 1)
    full_mask = torch.cat([m, rmask], 1)
    lp, _ = response_logprobs(lm, ids, full_mask, q.shape[1], temperature=0.7)
    # reference: each row alone, no padding, token by token
    for b in range(4):
        real = q[b][m[b].bool()]
        for t in range(int(rmask[b].sum())):
            ctx = torch.cat([real, resp[b, :t]])[None]
            logits = lm(ctx).logits[0, -1] / 0.7
            ref = torch.log_softmax(logits, -1)[resp[b, t]]
            torch.testing.assert_close(lp[b, t], ref, atol=1e-4, rtol=1e-4)


def test_lm_head_runs_on_response_positions_only(tok, lm):
    # The logits that predict the response are the Lr + 1 last positions' (minus the very last):
    # the LM head is applied there only, and the log-probs equal a gather from full logits.
    q, m, resp, rmask = _sampled(tok, lm, n=3, seed=5, new_tokens=5, temperature=1.0)
    ids, mask, Lq, Lr = torch.cat([q, resp], 1), torch.cat([m, rmask], 1), q.shape[1], resp.shape[1]
    shapes: list[tuple[int, ...]] = []
    hook = lm.lm_head.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(out.shape)))
    with torch.no_grad():
        lp, ent = response_logprobs(lm, ids, mask, Lq, temperature=0.7)
    hook.remove()
    assert shapes == [(3, Lr + 1, len(tok))]
    with torch.no_grad():
        full = lm(input_ids=ids, attention_mask=mask,
                  position_ids=position_ids_from_mask(mask)).logits  # fmt: skip
    log_p = torch.log_softmax(full[:, Lq - 1 : -1] / 0.7, -1)
    torch.testing.assert_close(lp, log_p.gather(-1, resp[..., None]).squeeze(-1))
    torch.testing.assert_close(ent, -(log_p.exp() * log_p).sum(-1))

    class NoKeep(torch.nn.Module):  # a model whose forward has no logits_to_keep
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, position_ids):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids)  # fmt: skip

    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(NoKeep(), ids, mask, Lq, 0.7), lp)


def test_scalar_head_save_load_and_score(lm, tmp_path, tok):
    rm = ScalarHeadModel.from_causal_lm(lm)
    batch = encode_pairs(tok, ["Patient: Hi\nAssistant:"] * 2, ["Booked.", "Open: none."],
                         64, 16)  # fmt: skip
    scores = rm.score(batch.input_ids, batch.attention_mask)
    values = rm(batch.input_ids, batch.attention_mask)
    last = last_token_index(batch.attention_mask)
    torch.testing.assert_close(scores, values[torch.arange(2), last])
    rm.save(tmp_path / "rm", {"bias": 0.5})
    again = ScalarHeadModel.load(tmp_path / "rm")
    torch.testing.assert_close(again.score(batch.input_ids, batch.attention_mask), scores)
    assert again.meta(tmp_path / "rm") == {"bias": 0.5}
    with pytest.raises(CheckpointError, match="not a model folder"):
        ScalarHeadModel.load(tmp_path)
    rm.trunk.save_pretrained(tmp_path / "trunk-only")  # a model, but no scalar head
    with pytest.raises(CheckpointError, match="not a reward or value model"):
        ScalarHeadModel.load(tmp_path / "trunk-only")
