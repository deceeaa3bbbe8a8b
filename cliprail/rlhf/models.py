"""Tokenizers and models: local training of a tokenizer, tiny GPT-2s from a config, scalar-head
models (reward and value) on a causal-LM trunk, and the log-prob maths shared by every stage.

All weights are saved as safetensors; loading never runs remote code unless asked.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from cliprail.errors import CheckpointError

PAD = "<|pad|>"
EOS = "<|endoftext|>"
HEAD_FILE = "scalar_head.safetensors"


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, extra_tokens: Iterable[str] = ()
) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` (GPT-2's scheme), as a
    ``PreTrainedTokenizerFast`` with ``<|endoftext|>`` as EOS and ``<|pad|>`` as padding.

    Each of ``extra_tokens`` becomes one token, matched in the raw text before BPE (spaces
    included, so ``" Tue 3 Mar 14:00"`` with its leading space is one id): a small model copies
    one id from the prompt far more easily than the four or five pieces BPE would make of it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, normalized=False) for t in dict.fromkeys(extra_tokens) if t])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, padding_side="left"
    )


def tokenizer_from_json(text: str) -> Any:
    """The tokenizer :func:`train_tokenizer` made, from its JSON (``backend_tokenizer.to_str()``):
    how rank 0 hands a tokenizer it trained to the other ranks."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(text),
        eos_token=EOS,
        bos_token=EOS,
        pad_token=PAD,
        padding_side="left",
    )


def tiny_gpt2(
    vocab_size: int,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_positions: int = 256,
    seed: int = 0,
    eos_token_id: int = 0,
    pad_token_id: int = 1,
) -> nn.Module:
    """A small GPT-2 built from a config, dropout off (as RLHF wants; Huang et al. 2024)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer from a local folder (or a hub id where a network exists)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists() and (len(path.parts) != 2 or str(path).startswith((".", "/"))):
        raise CheckpointError(f"{path}: model folder not found (no tokenizer there)")
    if path.is_file():
        raise CheckpointError(f"{path}: expected a model folder, found a file")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # the tokenizers library raises a bare Exception on a bad file
        raise CheckpointError(f"{path}: cannot load a tokenizer ({_first_line(exc)})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def check_model_folder(path: Path) -> None:
    """Refuse, with a clear message, what ``from_pretrained`` would fail on obscurely: a missing
    folder, one without ``config.json``, and pickle-only weights (never unpickled here)."""
    path = Path(path)
    if not path.exists():
        if len(path.parts) == 2 and not str(path).startswith((".", "/")):
            return  # "org/name": a hub id, where a network exists
        raise CheckpointError(f"{path}: model folder not found")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a model folder, found a file")
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path}: not a model folder (no config.json); a half-written "
            "save? point at a folder written by save_pretrained"
        )
    if not any(path.glob("*.safetensors")):
        pickle_suffixes = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in pickle_suffixes)
        if pickles:
            raise CheckpointError(
                f"{path}: weights only in pickle format ({', '.join(pickles)}); cliprail loads "
                "safetensors only. Convert them: load the model in a trusted session and "
                "save_pretrained(..., safe_serialization=True)"
            )
        raise CheckpointError(f"{path}: no *.safetensors weights (a half-written save?)")


_LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError, KeyError)
try:  # a truncated safetensors file raises this, not an OSError
    from safetensors import SafetensorError

    _LOAD_ERRORS = (*_LOAD_ERRORS, SafetensorError)
except ImportError:  # pragma: no cover - old safetensors
    pass


def load_causal_lm(path: Path, trust_remote_code: bool = False) -> nn.Module:
    """Load any ``AutoModelForCausalLM`` from ``path``; safetensors weights only."""
    from transformers import AutoModelForCausalLM

    check_model_folder(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except _LOAD_ERRORS as exc:
        raise CheckpointError(f"{path}: cannot load a causal LM ({_first_line(exc)})") from None
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_vocab(tokenizer: Any, model: nn.Module, where: str) -> None:
    """Raise a clear error when the tokenizer's ids do not fit the model's embedding."""
    n_embed = model.get_input_embeddings().num_embeddings  # type: ignore[operator]
    if len(tokenizer) > n_embed:
        raise CheckpointError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
            f"{n_embed}: they do not belong together"
        )


def last_token_scores(values: Tensor, attention_mask: Tensor) -> Tensor:
    """``(B,)`` the ``(B, L)`` per-position scalars at each sequence's last real token."""
    return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)


class ScalarHeadModel(nn.Module):
    """A causal-LM trunk with a scalar head: one number per token (value model) or per sequence
    (reward model: the number at the last real token)."""

    def __init__(self, trunk: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_causal_lm(cls, lm: nn.Module) -> ScalarHeadModel:
        """Wrap the transformer body of a causal LM (its LM head is dropped)."""
        trunk: Any = lm.base_model
        config: Any = lm.config
        return cls(trunk, int(config.hidden_size))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``(B, L)`` scalars, one per position."""
        out = self.trunk(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        )
        return self.head(out.last_hidden_state).squeeze(-1)

    def score(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``(B,)`` the scalar at each sequence's last real token."""
        return last_token_scores(self(input_ids, attention_mask), attention_mask)

    def save(
        self,
        path: Path,
        extra: dict[str, Any] | None = None,
        state_dict: dict[str, Tensor] | None = None,
    ) -> None:
        """Save to ``path``: the trunk as a Hugging Face folder, the head beside it. Pass the
        full ``state_dict`` when the parameters are sharded (FSDP)."""
        path.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            trunk_state, head_state = None, self.head.state_dict()
        else:
            trunk_state = {k[6:]: v for k, v in state_dict.items() if k.startswith("trunk.")}
            head_state = {k[5:]: v for k, v in state_dict.items() if k.startswith("head.")}
        self.trunk.save_pretrained(str(path), state_dict=trunk_state)  # type: ignore[operator]
        save_file({k: v.contiguous() for k, v in head_state.items()}, str(path / HEAD_FILE))
        (path / "scalar_head.json").write_text(json.dumps(extra or {}, indent=2))

    @classmethod
    def load(cls, path: Path, trust_remote_code: bool = False) -> ScalarHeadModel:
        from transformers import AutoModel

        check_model_folder(path)
        if not (path / HEAD_FILE).is_file():
            raise CheckpointError(f"{path}: not a reward or value model (no {HEAD_FILE})")
        try:
            trunk = AutoModel.from_pretrained(
                str(path), trust_remote_code=trust_remote_code, use_safetensors=True
            )
            model = cls(trunk, int(trunk.config.hidden_size))
            model.head.load_state_dict(load_file(str(path / HEAD_FILE)))
        except _LOAD_ERRORS as exc:
            raise CheckpointError(
                f"{path}: cannot load the scalar-head model ({_first_line(exc)})"
            ) from None
        return model

    def meta(self, path: Path) -> dict[str, Any]:
        f = path / "scalar_head.json"
        return json.loads(f.read_text()) if f.is_file() else {}


def model_device(model: nn.Module) -> torch.device:
    """The device ``model``'s parameters live on (the CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that skip left padding: ``cumsum(mask) - 1``, clamped at 0 (REFERENCES
    pitfall: generation and the training forward must agree on them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """``(B,)`` index of the last real token of each row (works with left and right padding)."""
    L = attention_mask.shape[1]
    positions = torch.arange(L, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values.clamp_min(0)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """``(B, L)`` log p(label) under ``logits`` ``(B, L, V)``: log_softmax then gather, in
    float32 for half-precision logits and in the logits' own dtype otherwise (float64 stays
    float64)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _response_log_softmax(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    query_len: int,
    temperature: float,
) -> Tensor:
    """``(B, Lr, V)`` log-softmax of the logits that predict the response tokens: the logits at
    position ``t`` predict token ``t + 1``, so ``input_ids[:, Lq:]`` are scored by
    ``logits[:, Lq - 1 : -1]``, divided by ``temperature`` exactly as in sampling."""
    keep = input_ids.shape[1] - query_len + 1  # the Lr + 1 last positions
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        **logits_to_keep_kwarg(model, keep),
    )
    # (B, keep or Lq + Lr, V) -> (B, Lr, V): the same positions whether or not the model kept
    # only the last ``keep``
    logits = out.logits[:, -keep:-1].float() / temperature
    return torch.log_softmax(logits, dim=-1)


_KEEPS_LOGITS: dict[type, bool] = {}


def logits_to_keep_kwarg(model: nn.Module, keep: int) -> dict[str, int]:
    """``{"logits_to_keep": keep}`` when ``model`` (or the module a DDP wrapper holds) takes it,
    else ``{}``. Hugging Face causal LMs then apply the LM head to the last ``keep`` positions
    only: a prompt's positions need no logits, and ``(B, L, V)`` float logits are the largest
    activation of a training step when the vocabulary is large (V = 50k-150k)."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    kind = type(inner)
    if kind not in _KEEPS_LOGITS:
        try:
            _KEEPS_LOGITS[kind] = "logits_to_keep" in inspect.signature(inner.forward).parameters
        except (TypeError, ValueError):  # no inspectable signature
            _KEEPS_LOGITS[kind] = False
    return {"logits_to_keep": keep} if _KEEPS_LOGITS[kind] else {}


def token_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    query_len: int,
    temperature: float = 1.0,
) -> Tensor:
    """``(B, Lr)`` log-probs of the response tokens of ``input_ids`` ``(B, Lq + Lr)``; for the
    callers that need no entropy (reference passes, SFT, DPO, evaluation)."""
    log_p = _response_log_softmax(model, input_ids, attention_mask, query_len, temperature)
    return log_p.gather(-1, input_ids[:, query_len:].unsqueeze(-1)).squeeze(-1)


def response_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    query_len: int,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Log-probs and entropies of the response tokens of ``input_ids`` ``(B, Lq + Lr)``: two
    ``(B, Lr)`` tensors (see :func:`token_logprobs` when the entropy is not needed)."""
    log_p = _response_log_softmax(model, input_ids, attention_mask, query_len, temperature)
    logprobs = log_p.gather(-1, input_ids[:, query_len:].unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logprobs, entropy
