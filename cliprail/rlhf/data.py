"""JSONL datasets (prompts, demonstrations, preference pairs) with errors that name the file,
the line and the field, and the tokenisation shared by every stage.

Schemas (one JSON object per line; docs/healthcare.md has the full field lists):

* ``prompts.jsonl``: the healthcare :class:`~cliprail.scenarios.healthcare.Request` fields, at
  least ``id`` and ``prompt``; ``split`` is ``train``, ``eval`` or ``redteam``.
* ``demonstrations.jsonl``: ``prompt``, ``response``.
* ``preferences.jsonl``: ``prompt``, ``chosen``, ``rejected`` (and optionally ``reviewer``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cliprail.errors import CliprailError


class DataError(CliprailError):
    """A data file is missing or malformed; the message names file, line and field."""


MAX_LINE_BYTES = 1 << 20
"""A longer JSONL line is refused: no prompt or response of this world comes near 1 MiB, and a
line that size is a corrupt or hostile file, not data."""


def read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """Read ``path``; every record must be an object with non-empty string ``fields``."""
    return [rec for _, rec in read_jsonl_lines(path, fields)]


def read_jsonl_lines(path: Path, fields: tuple[str, ...] = ()) -> list[tuple[int, dict[str, Any]]]:
    """:func:`read_jsonl` with each record's line number (for errors found later)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (some editors write one)
        raw = raw[3:]
    records = []
    for n, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_BYTES:
            raise DataError(
                f"{path}:{n}: line of {len(line):,} bytes, more than the "
                f"{MAX_LINE_BYTES:,}-byte limit of one record"
            )
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{n}: not valid UTF-8 (byte {exc.start})") from None
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{n}: malformed JSON ({exc.msg} at column {exc.colno})"
            ) from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        for f in fields:
            if f not in rec:
                raise DataError(f"{path}:{n}: missing field {f!r}")
            if not isinstance(rec[f], str):
                raise DataError(
                    f"{path}:{n}: field {f!r} must be a string, got {type(rec[f]).__name__}"
                )
            if not rec[f].strip():
                raise DataError(f"{path}:{n}: field {f!r} is empty")
        records.append((n, rec))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def read_extra_tokens(path: Path | None) -> list[str]:
    """The strings of a tokens file (a JSON list of non-empty strings); none for no file."""
    if path is None:
        return []
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a JSON list of strings ({exc})") from None
    if not isinstance(items, list) or not all(isinstance(t, str) and t for t in items):
        raise DataError(f"{path}: expected a JSON list of non-empty strings")
    return items


def load_preferences(
    path: Path, tokenizer: Any = None, mapping: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Preference pairs, plain or chat
    (:func:`cliprail.rlhf.records.load_preference_pairs`); chosen identical to rejected is an
    error (the pair teaches nothing)."""
    from cliprail.rlhf.records import load_preference_pairs

    return load_preference_pairs(path, tokenizer, mapping)


@dataclass
class Batch:
    """Token ids and masks of ``prompt + response`` sequences, left-padded prompts."""

    input_ids: Tensor  # (B, Lq + Lr)
    attention_mask: Tensor  # (B, Lq + Lr)
    response_mask: Tensor  # (B, Lr) real response tokens (EOS included)
    query_len: int

    def to(self, device: torch.device | str) -> Batch:
        """The batch on ``device`` (itself when it is there already)."""
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.response_mask.to(device),
            self.query_len,
        )


def encode_prompts(tokenizer: Any, prompts: list[str], max_len: int) -> tuple[Tensor, Tensor]:
    """Left-padded ``(B, Lq)`` ids and mask. A prompt longer than ``max_len`` tokens is an
    error naming it (truncating it would silently drop the calendar or the question)."""
    enc = [tokenizer.encode(p) for p in prompts]
    for p, ids in zip(prompts, enc, strict=True):
        if len(ids) > max_len:
            raise DataError(
                f"a prompt of {len(ids)} tokens exceeds the context budget of {max_len} "
                f"(prompt starts {p[:60]!r}); raise --max-prompt-len or shorten it"
            )
    L = max(len(ids) for ids in enc)
    pad = tokenizer.pad_token_id
    ids_t = torch.full((len(enc), L), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), L), dtype=torch.long)
    for i, ids in enumerate(enc):
        if ids:
            ids_t[i, L - len(ids) :] = torch.tensor(ids)
            mask[i, L - len(ids) :] = 1
    return ids_t, mask


def encode_pairs(
    tokenizer: Any,
    prompts: list[str],
    responses: list[str],
    max_prompt_len: int,
    max_response_len: int,
) -> Batch:
    """Prompts left-padded, responses (with EOS appended) right-padded and cut to
    ``max_response_len`` tokens."""
    q_ids, q_mask = encode_prompts(tokenizer, prompts, max_prompt_len)
    eos = tokenizer.eos_token_id
    resp = []
    for r in responses:
        if not r.strip():
            raise DataError("an empty response cannot be trained on")
        resp.append([*tokenizer.encode(" " + r.strip()), eos][:max_response_len])
    Lr = max(len(r) for r in resp)
    r_ids = torch.full((len(resp), Lr), tokenizer.pad_token_id, dtype=torch.long)
    r_mask = torch.zeros((len(resp), Lr), dtype=torch.long)
    for i, ids in enumerate(resp):
        r_ids[i, : len(ids)] = torch.tensor(ids)
        r_mask[i, : len(ids)] = 1
    return Batch(
        torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1), r_mask, q_ids.shape[1]
    )
