"""Prompts in the forms people have them, as one record type every RLHF stage reads.

A prompt record is a prompt text, an id, a split and whatever other fields its source held; the
other fields travel with it to the checks and reward functions (:mod:`cliprail.rlhf.checks`).
Sources, each through :func:`load_prompts`:

* a JSONL file of ``{"prompt": ...}`` lines (optional ``id``, ``split``; any other field is
  kept), or of chat records ``{"messages": [{"role", "content"}, ...]}``, rendered with the
  tokenizer's chat template (:func:`render_chat`);
* a Hugging Face dataset on disk (a ``save_to_disk`` folder, a parquet file, or a JSONL file
  read through the ``datasets`` library with ``--prompt-column`` and friends naming the
  columns);
* the healthcare world's ``prompts.jsonl``: a record with the healthcare request fields is a
  prompt with extra fields, and also carries its :class:`~cliprail.scenarios.healthcare.Request`
  for the gold judge.

Splits: ``train`` feeds the rollouts; ``val`` is where the safety fuse chooses and halts (the
first 10% of the prompts, at most 120, when a source names no split at all); ``eval`` is for
``rlhf eval`` and the reports; ``redteam`` is evaluated by the fuse beside ``val``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cliprail.rlhf.data import DataError, read_jsonl_lines
from cliprail.scenarios.healthcare import Request

SPLITS = ("train", "val", "eval", "redteam")
HEALTHCARE_FIELDS = frozenset({"kind", "clinician", "department", "open_slots"})
"""A record with any of these is read as a healthcare request (and must be a valid one)."""
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PromptRecord:
    """One prompt and what came with it."""

    id: str
    prompt: str
    """The text the policy continues (a chat record: rendered by the chat template)."""
    split: str = "train"
    fields: Mapping[str, Any] = field(default_factory=dict, compare=False)
    """The source record as read (a chat record's ``messages`` included), passed to checks and
    reward functions as it is."""
    request: Request | None = field(default=None, compare=False)
    """The healthcare request, when the record is one (the gold judge reads it)."""


@dataclass(frozen=True)
class Columns:
    """Which columns of a dataset hold what (a JSONL file uses the same names as keys)."""

    prompt: str = "prompt"
    messages: str = "messages"
    id: str = "id"
    split: str = "split"


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]], where: str) -> str:
    """A chat prompt as the policy sees it: the tokenizer's chat template with the generation
    prompt added, or, for a tokenizer without one (a BPE trained locally), the plain template
    ``"<role>: <content>\\n"`` per message followed by ``"assistant:"``. ``messages`` must end
    with a user (or system) turn: the assistant's reply is what the policy writes. SFT renders a
    demonstration's prompt part with this same function, so the prompt the policy is trained on
    and the one it is asked are the same text."""
    check_messages(messages, where, ends_with_assistant=False)
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
        )
        return str(text)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def check_messages(
    messages: Any, where: str, ends_with_assistant: bool | None = None
) -> list[Mapping[str, Any]]:
    """``messages`` as a list of ``{"role", "content"}`` with known roles and string content;
    ``ends_with_assistant`` True/False requires the last turn to be (or not be) the
    assistant's. Errors name ``where`` and the message's index."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m:
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(
                f"{where}: messages[{i}]: unknown role {m['role']!r}; expected one of {ROLES}"
            )
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise DataError(f"{where}: messages[{i}]: 'content' must be a non-empty string")
    last = messages[-1]["role"]
    if ends_with_assistant is True and last != "assistant":
        raise DataError(f"{where}: no assistant turn at the end of 'messages' to learn from")
    if ends_with_assistant is False and last == "assistant":
        raise DataError(
            f"{where}: 'messages' of a prompt ends with an assistant turn; a prompt ends with "
            "the user's turn (the reply is what the policy writes)"
        )
    return messages


def _record(
    rec: Mapping[str, Any], n: int, where: str, cols: Columns, tokenizer: Any
) -> PromptRecord:
    """One source record -> a :class:`PromptRecord`; ``where`` names the file and line."""
    rec = dict(rec)
    split = rec.get(cols.split, "train")
    if split is None or (isinstance(split, float) and math.isnan(split)):
        split = "train"
    if split not in SPLITS:
        raise DataError(f"{where}: field {cols.split!r} must be one of {SPLITS}, got {split!r}")
    rid = rec.get(cols.id)
    rid = str(rid) if rid is not None and str(rid).strip() else f"p{n}"
    if HEALTHCARE_FIELDS & set(rec):  # the healthcare schema: a prompt with extra fields
        try:
            request = Request.from_json(rec)
        except ValueError as exc:
            raise DataError(f"{where}: not a healthcare request: {exc}") from None
        return PromptRecord(request.id, request.prompt, request.split, rec, request)
    if cols.prompt in rec and rec[cols.prompt] is not None:
        text = rec[cols.prompt]
        if not isinstance(text, str):
            raise DataError(
                f"{where}: field {cols.prompt!r} must be a string, got {type(text).__name__}"
            )
    elif cols.messages in rec and rec[cols.messages] is not None:
        text = render_chat(tokenizer, rec[cols.messages], where)
    else:
        raise DataError(
            f"{where}: missing field {cols.prompt!r} (or {cols.messages!r} for a chat record)"
        )
    if not text.strip():
        raise DataError(f"{where}: field {cols.prompt!r} is empty")
    return PromptRecord(rid, text, split, rec)


def _from_dataset(path: Path, cols: Columns) -> list[dict[str, Any]]:
    """The rows of a Hugging Face dataset on disk (:func:`_dataset_rows`); the named columns
    must exist. A ``DatasetDict``'s split names become the rows' splits (test -> eval,
    validation -> val)."""
    rows = _dataset_rows(path, cols.split)
    _check_columns(path, set().union(*(r.keys() for r in rows)) if rows else set(), cols)
    return rows


def _check_columns(path: Path, columns: set[str], cols: Columns) -> None:
    if (
        cols.prompt not in columns
        and cols.messages not in columns
        and not (HEALTHCARE_FIELDS & columns)
    ):
        raise DataError(
            f"{path}: no column {cols.prompt!r} (nor {cols.messages!r}); its columns are "
            f"{sorted(columns)}: name the prompt column with --prompt-column"
        )


def load_prompts(
    path: Path, tokenizer: Any = None, columns: Columns = Columns(), val_share: float = 0.1
) -> list[PromptRecord]:
    """Every prompt record of ``path`` (see the module docstring for the forms), in order.

    A ``.jsonl`` file with the default columns is read line by line (errors name file, line and
    field); any other file, a folder, or custom column names go through ``datasets``. Ids must
    be unique. When no record names a split, the first ``val_share`` of them (at most 120) become
    ``val`` for the fuse and the rest ``train``."""
    path = Path(path)
    by_lines = path.suffix == ".jsonl" and columns == Columns()
    if by_lines:
        rows = [(f"{path}:{n}", r) for n, r in read_jsonl_lines(path)]
    else:
        rows = [(f"{path}: row {i + 1}", r) for i, r in enumerate(_from_dataset(path, columns))]
        if not rows:
            raise DataError(f"{path}: no records")
    records = [_record(r, n, where, columns, tokenizer) for n, (where, r) in enumerate(rows, 1)]
    seen: dict[str, int] = {}
    for n, r in enumerate(records, start=1):
        if r.id in seen:
            raise DataError(f"{path}: record {n}: id {r.id!r} repeats record {seen[r.id]}")
        seen[r.id] = n
    named = any(columns.split in r for _, r in rows)
    if not named and len(records) > 1:
        n_val = min(120, max(1, int(len(records) * val_share)))
        records = [
            PromptRecord(r.id, r.prompt, "val" if i < n_val else "train", r.fields, r.request)
            for i, r in enumerate(records)
        ]
    return records


def healthcare_only(records: Sequence[PromptRecord]) -> bool:
    """Whether every record is a healthcare request (then the gold judge can grade them)."""
    return bool(records) and all(r.request is not None for r in records)


def record_json(record: PromptRecord) -> dict[str, Any]:
    """The record as a checks or reward function receives it: its source fields, plus ``id``,
    ``prompt`` (the rendered text) and ``split``."""
    return {**dict(record.fields), "id": record.id, "prompt": record.prompt, "split": record.split}


def dump_prompts(records: Sequence[PromptRecord]) -> str:
    """JSONL text of ``records`` (the rendered prompt, id, split and the other fields)."""
    return "".join(json.dumps(record_json(r)) + "\n" for r in records)


def _chat_pair(messages: Any, where: str, tokenizer: Any) -> tuple[str, str]:
    """(rendered prompt, the last assistant turn's content) of a chat demonstration."""
    msgs = check_messages(messages, where, ends_with_assistant=True)
    if len(msgs) < 2:
        raise DataError(f"{where}: 'messages' needs a user turn before the assistant's")
    return render_chat(tokenizer, msgs[:-1], where), str(msgs[-1]["content"])


def _text(rec: Mapping[str, Any], key: str, where: str) -> str:
    if key not in rec:
        raise DataError(f"{where}: missing field {key!r}")
    value = rec[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def parse_column_map(spec: str, allowed: Sequence[str], flag: str = "--columns") -> dict[str, str]:
    """``"prompt=question,response=answer"`` -> ``{"prompt": "question", ...}``: which column of
    the data holds each field cliprail reads (``allowed``)."""
    out: dict[str, str] = {}
    for part in filter(None, (x.strip() for x in spec.split(","))):
        key, sep, column = part.partition("=")
        if not sep or not column.strip() or key.strip() not in allowed:
            raise DataError(
                f"{flag} {spec!r}: expected FIELD=COLUMN pairs, FIELD one of {list(allowed)}"
            )
        out[key.strip()] = column.strip()
    return out


def read_rows(
    path: Path, mapping: Mapping[str, str] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for each record of a data file: a ``.jsonl`` file line by line (where is
    ``file:line``), or a dataset on disk (folder, parquet, JSON) through ``datasets`` (where is
    ``file: row n``); ``mapping`` renames columns to the fields cliprail reads (a named column
    that is not there is an error listing the columns)."""
    path = Path(path)
    mapping = dict(mapping or {})
    if path.suffix == ".jsonl" and path.is_file():
        rows = [(f"{path}:{n}", r) for n, r in read_jsonl_lines(path)]
    else:
        rows = [(f"{path}: row {i + 1}", r) for i, r in enumerate(_dataset_rows(path))]
        if not rows:
            raise DataError(f"{path}: no records")
    if mapping:
        columns = set().union(*(r.keys() for _, r in rows))
        absent = [c for c in mapping.values() if c not in columns]
        if absent:
            raise DataError(f"{path}: no column {absent[0]!r}; its columns are {sorted(columns)}")
        back = {column: field for field, column in mapping.items()}
        rows = [(w, {back.get(k, k): v for k, v in r.items()}) for w, r in rows]
    return rows


def _dataset_rows(path: Path, split_key: str = "split") -> list[dict[str, Any]]:
    """Every row of a dataset on disk (a ``save_to_disk`` folder, a parquet or JSON file), read
    by ``datasets`` with its progress bars off; a ``DatasetDict``'s split name goes into each
    row under ``split_key``."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency of the package
        raise DataError(f"{path}: reading a dataset needs the 'datasets' package") from None
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            ds: Any = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                names = {"test": "eval", "validation": "val"}
                return [{split_key: names.get(n, n), **r} for n in ds for r in ds[n]]
        elif path.suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
        return [dict(r) for r in ds]
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except Exception as exc:  # datasets raises many types for a file it cannot read
        raise DataError(
            f"{path}: cannot read it as a dataset ({type(exc).__name__}: {exc})"
        ) from None
    finally:
        if bars:
            datasets.enable_progress_bars()


def load_demonstrations(
    path: Path, tokenizer: Any = None, mapping: Mapping[str, str] | None = None
) -> list[dict[str, str]]:
    """SFT demonstrations as ``{"prompt", "response"}``: records of that form, or chat records
    ``{"messages": [..., {"role": "assistant", "content": ...}]}`` whose last assistant turn is
    the response and whose earlier turns are rendered as the prompt (:func:`render_chat`, the
    rendering PPO gives chat prompts); a JSONL file or a dataset on disk (:func:`read_rows`)."""
    out = []
    for where, rec in read_rows(Path(path), mapping):
        if "messages" in rec and "prompt" not in rec:
            prompt, response = _chat_pair(rec["messages"], where, tokenizer)
            if not response.strip():
                raise DataError(f"{where}: the last assistant turn is empty")
        else:
            prompt, response = _text(rec, "prompt", where), _text(rec, "response", where)
        out.append({"prompt": prompt, "response": response})
    return out


def load_preference_pairs(
    path: Path, tokenizer: Any = None, mapping: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Preference pairs as ``{"prompt", "chosen", "rejected"}`` (and ``reviewer`` when given):
    lines of that form, or chat pairs ``{"chosen": [messages], "rejected": [messages]}`` that
    share every turn but the last assistant one (the shared turns are the prompt). A pair whose
    two answers are the same teaches nothing and is an error."""
    out = []
    for where, rec in read_rows(Path(path), mapping):
        if isinstance(rec.get("chosen"), list) or isinstance(rec.get("rejected"), list):
            p1, chosen = _chat_pair(rec.get("chosen"), f"{where}: chosen", tokenizer)
            p2, rejected = _chat_pair(rec.get("rejected"), f"{where}: rejected", tokenizer)
            if p1 != p2:
                raise DataError(
                    f"{where}: 'chosen' and 'rejected' must share every turn but the last"
                )
            pair: dict[str, Any] = {"prompt": p1, "chosen": chosen, "rejected": rejected}
        else:
            pair = {k: _text(rec, k, where) for k in ("prompt", "chosen", "rejected")}
        if "reviewer" in rec:
            pair["reviewer"] = rec["reviewer"]
        if pair["chosen"] == pair["rejected"]:
            raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
        out.append(pair)
    return out


CHAT_FILE = "chat_rendering.json"
"""Written by SFT beside its model: how that model's chat demonstrations were rendered."""
PROBE = ({"role": "system", "content": "S"}, {"role": "user", "content": "U"})
"""A fixed conversation whose rendering identifies a chat template."""


def chat_signature(tokenizer: Any) -> str:
    """How ``tokenizer`` renders chat prompts (the rendering of :data:`PROBE`). SFT saves it
    beside a model it trained on chat demonstrations; PPO and the reward model compare: another
    template would show the policy prompts it never learned from."""
    return render_chat(tokenizer, [dict(m) for m in PROBE], "chat probe")


def check_chat_rendering(model_dir: Path, tokenizer: Any, what: str) -> None:
    """Refuse chat ``what`` (prompts, pairs) when ``tokenizer`` renders chat otherwise than the
    SFT run behind ``model_dir`` rendered its demonstrations: the policy would be asked prompts
    in a layout it never learned. A model folder without the record (not from cliprail's SFT)
    passes."""
    f = Path(model_dir) / CHAT_FILE
    if not f.is_file():
        return
    try:
        saved = json.loads(f.read_text()).get("signature")
    except (OSError, ValueError, AttributeError):
        raise DataError(f"{f}: unreadable; expected {{'signature': ...}}") from None
    now = chat_signature(tokenizer)
    if saved != now:
        raise DataError(
            f"{what}: the chat template renders prompts as {now!r} but the SFT model in "
            f"{model_dir} learned from demonstrations rendered as {saved!r}; use the SFT model's "
            "own tokenizer, or render the prompts yourself as plain 'prompt' text"
        )


def records_from(
    items: Sequence[str | Mapping[str, Any]], tokenizer: Any = None, val_share: float = 0.1
) -> list[PromptRecord]:
    """Prompt records from memory: strings, or dicts in any of :func:`load_prompts`' record
    forms (``prompt`` with extra fields, ``messages``, a healthcare request). Splits as
    :func:`load_prompts` assigns them."""
    rows = [{"prompt": x} if isinstance(x, str) else dict(x) for x in items]
    if not rows:
        raise DataError("no prompts given")
    records = [_record(r, n, f"prompt {n}", Columns(), tokenizer) for n, r in enumerate(rows, 1)]
    if not any("split" in r for r in rows) and len(records) > 1:
        n_val = min(120, max(1, int(len(records) * val_share)))
        records = [
            PromptRecord(r.id, r.prompt, "val" if i < n_val else "train", r.fields, r.request)
            for i, r in enumerate(records)
        ]
    return records
