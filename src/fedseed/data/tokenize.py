"""Tokenise examples for causal-LM fine-tuning with the loss on the response only.

fedseed's own way (template ``alpaca``) tokenises the prompt and the response
separately, so the boundary between them is exact (no search for the response start
in the joined token sequence) and the labels can mask every prompt token with
:data:`IGNORE_INDEX`. The paper templates (``fedkseed-*``) do what the official code
does instead: one text ``prompt + response + eos``, truncated from the right, with
the first ``len(tokenize(prompt))`` labels masked. Too-long examples are handled
here, once, and counted, so a run can report how much text it cut.

This module does not build prompts (see :mod:`fedseed.data.prompts`), shuffle or
batch across clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedseed.data.errors import DataError
from fedseed.data.example import Example
from fedseed.data.prompts import TEMPLATES, format_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` skips (its ``ignore_index``)."""


@dataclass(frozen=True)
class TokenizedExample:
    """One example as token ids, with labels that score only the response.

    Parameters
    ----------
    input_ids : tuple of int
        ``bos + prompt + response + eos`` (the response possibly truncated, in which
        case the eos is cut too).
    labels : tuple of int
        Same length as ``input_ids``: ``IGNORE_INDEX`` on the prompt, the token id on
        each response token (and eos). Labels are not shifted; the model shifts them.
    prompt_length : int
        Number of prompt tokens (bos included); generation starts after them.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt_length: int

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.input_ids):
            raise DataError(
                f"`labels` has {len(self.labels)} tokens but `input_ids` has "
                f"{len(self.input_ids)}; they must line up one to one"
            )
        if not 0 < self.prompt_length < len(self.input_ids):
            raise DataError(
                f"`prompt_length` = {self.prompt_length} must leave at least one "
                f"response token in {len(self.input_ids)} tokens"
            )


@dataclass(frozen=True)
class TruncationStats:
    """How :func:`tokenize_examples` treated examples longer than ``max_length``.

    Parameters
    ----------
    total : int
        Examples given.
    kept : int
        Examples returned (``total - dropped``); includes the truncated ones.
    truncated : int
        Kept examples whose response was cut from the right to fit.
    dropped : int
        Examples whose prompt alone filled ``max_length``, leaving no response token
        to learn from.
    """

    total: int
    kept: int
    truncated: int
    dropped: int


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids for each text, with no special tokens (we add bos/eos ourselves)."""
    if not texts:
        return []
    # verbose=False: the "longer than the model's maximum length" warning is moot,
    # since tokenize_examples truncates to `max_length` itself.
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [list(map(int, row)) for row in ids]


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], int]:
    """``([bos] or [], eos)``; a tokenizer without eos cannot mark where a response ends."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(
            "the tokenizer has no `eos_token_id`; responses must end with eos so the "
            "model learns to stop. Set `tokenizer.eos_token` before tokenising"
        )
    bos = tokenizer.bos_token_id
    return ([int(bos)] if bos is not None else []), int(eos)


def _fit(prompt: list[int], response: list[int], max_length: int) -> TokenizedExample | None:
    """Cut the response from the right to fit; ``None`` when the prompt leaves no room."""
    room = max_length - len(prompt)
    if room < 1:
        return None
    response = response[:room]
    return TokenizedExample(
        input_ids=tuple(prompt + response),
        labels=(IGNORE_INDEX,) * len(prompt) + tuple(response),
        prompt_length=len(prompt),
    )


def tokenize_examples(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_length: int, template: str = "alpaca"
) -> tuple[list[TokenizedExample], TruncationStats]:
    """Tokenise ``examples`` with :func:`format_prompt` and ``template``, scoring only the response.

    Parameters
    ----------
    examples : sequence of Example
    tokenizer : transformers.PreTrainedTokenizerBase
        Must have an eos token; bos is prepended when the tokenizer has one.
    max_length : int
        Longest sequence kept. The response is truncated (from the right, so its
        start is kept) to fit; an example whose prompt alone reaches ``max_length``
        is dropped because it has nothing to learn from.

    Returns
    -------
    tokenized : list of TokenizedExample
        In input order, dropped examples left out.
    stats : TruncationStats
        Counts of kept, truncated and dropped examples, to be reported by the run.
    """
    if max_length < 2:
        raise DataError(
            f"`max_length` must be >= 2 (one prompt token and one response token), got {max_length}"
        )
    if TEMPLATES[template].joint:
        return _tokenize_joint(examples, tokenizer, max_length, template)
    bos, eos = _special_ids(tokenizer)
    prompts = _encode(tokenizer, [format_prompt(ex) for ex in examples])
    responses = _encode(tokenizer, [ex.output for ex in examples])
    kept: list[TokenizedExample] = []
    truncated = 0
    for prompt, response in zip(prompts, responses, strict=True):
        full_response = response + [eos]
        item = _fit(bos + prompt, full_response, max_length)
        if item is None:
            continue
        if len(item.input_ids) - item.prompt_length < len(full_response):
            truncated += 1
        kept.append(item)
    stats = TruncationStats(
        total=len(examples), kept=len(kept), truncated=truncated, dropped=len(examples) - len(kept)
    )
    return kept, stats


def _tokenize_joint(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_length: int, template: str
) -> tuple[list[TokenizedExample], TruncationStats]:
    """The FedKSeed code's ``preprocess``: tokenizer(prompt + response + eos text), labels masked over the prompt.

    Both texts go through the tokenizer with its own special tokens (a Llama
    tokenizer prepends bos) and are cut at ``max_length`` from the right; the eos is
    the tokenizer's eos *text*, which it reads back as the eos token. An example whose
    prompt fills ``max_length`` has no response token left and is dropped (the
    official code keeps it, and its step meets a NaN loss and is skipped).
    """
    _special_ids(tokenizer)  # the eos check
    sources = [format_prompt(ex, template) for ex in examples]
    texts = [source + ex.output + tokenizer.eos_token for source, ex in zip(sources, examples, strict=True)]

    def encode(batch: list[str]) -> list[list[int]]:
        return tokenizer(batch, add_special_tokens=True, verbose=False)["input_ids"]

    kept: list[TokenizedExample] = []
    truncated = 0
    for source, full in zip(encode(sources), encode(texts), strict=True):
        prompt_length = min(len(source), max_length)
        if prompt_length >= min(len(full), max_length):
            continue
        truncated += len(full) > max_length
        full = [int(t) for t in full[:max_length]]
        kept.append(TokenizedExample(tuple(full), (IGNORE_INDEX,) * prompt_length + tuple(full[prompt_length:]),
                                     prompt_length))
    stats = TruncationStats(total=len(examples), kept=len(kept), truncated=truncated, dropped=len(examples) - len(kept))
    return kept, stats


def collate(batch: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``batch`` into tensors for a causal-LM forward pass.

    Parameters
    ----------
    batch : sequence of TokenizedExample
    pad_id : int
        Id written into padded ``input_ids`` positions. Its value does not matter for
        the loss (padding is masked in ``attention_mask`` and ``labels``), so the eos id
        is a fine choice for tokenizers with no pad token.

    Returns
    -------
    dict of str to torch.Tensor
        ``input_ids``, ``attention_mask`` and ``labels``, each ``(B, T)`` int64 with
        ``T`` the longest example; padded labels are ``IGNORE_INDEX``.
    """
    if not batch:
        raise DataError("`batch` is empty; collate needs at least one example")
    width = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass(frozen=True)
class ClassifiedExample:
    """One sentence as encoder input ids with its class index (SST-2 and other GLUE-style tasks)."""

    input_ids: tuple[int, ...]
    label: int


def tokenize_classification(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_length: int, classes: Sequence[str]
) -> tuple[list[ClassifiedExample], TruncationStats]:
    """Encode each example's ``input`` with the tokenizer's own special tokens; the label is ``output``'s class index.

    Sentences are truncated (never dropped) to ``max_length``: the class is still known.
    """
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({ex.output for ex in examples} - set(index))
    if unknown:
        raise DataError(f"labels {unknown[:3]} are not among the classes {list(classes)}")
    ids = tokenizer([ex.input for ex in examples], add_special_tokens=True, verbose=False)["input_ids"]
    out, truncated = [], 0
    for row, ex in zip(ids, examples, strict=True):
        truncated += len(row) > max_length
        row = list(row[: max_length - 1]) + [row[-1]] if len(row) > max_length else list(row)
        out.append(ClassifiedExample(tuple(map(int, row)), index[ex.output]))
    return out, TruncationStats(total=len(examples), kept=len(out), truncated=truncated, dropped=0)


def collate_classification(batch: Sequence[ClassifiedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` (B, T) and ``labels`` (B,)."""
    if not batch:
        raise DataError("`batch` is empty; collate needs at least one example")
    width = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    for row, ex in enumerate(batch):
        input_ids[row, : len(ex.input_ids)] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[row, : len(ex.input_ids)] = 1
    labels = torch.tensor([ex.label for ex in batch], dtype=torch.long)  # (B,)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
