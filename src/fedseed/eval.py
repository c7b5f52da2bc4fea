"""Evaluation: held-out loss, Rouge-L and GSM8K accuracy on greedy generations, classification accuracy.

Used during a run (by the runners) and by ``fedseed eval``. Functions take a
``transformers`` model and plain data; they never change weights.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch

from fedseed.data import IGNORE_INDEX, ClassifiedExample, TokenizedExample, collate, collate_classification


@torch.no_grad()
def heldout_loss(module: torch.nn.Module, examples: Sequence[TokenizedExample], batch_size: int, pad_id: int) -> float:
    """Token-weighted mean cross-entropy over the response tokens of ``examples``."""
    device = next(module.parameters()).device
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id)
        logits = module(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"][:, 1:].to(device)  # (B, T-1): token t predicts t+1
        logits = logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += float(loss)
        tokens += int((labels != IGNORE_INDEX).sum())
    return total / max(tokens, 1)


@torch.no_grad()
def generate(module: torch.nn.Module, tokenizer, examples: Sequence[TokenizedExample], max_new_tokens: int,
             batch_size: int, progress: Callable[[int], None] | None = None) -> list[str]:
    """Greedy continuations of each example's prompt (left-padded batches)."""
    device = next(module.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = []
    for i in range(0, len(examples), batch_size):
        prompts = [ex.input_ids[: ex.prompt_length] for ex in examples[i : i + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        out = cast(Any, module).generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        if progress:
            progress(len(prompts))
    return outputs  # as decoded: the official Rouge-L scores the text unstripped


ROUGE = ("official", "rouge-score")


def rouge_l(predictions: Sequence[str], references: Sequence[str], implementation: str = "official") -> float:
    """Mean Rouge-L F-measure over the pairs, in percent.

    ``official`` is what the FedKSeed and Ferret code report (``evaluations.rouge_score``,
    see docs/official-pipelines.md): the ``rouge`` package, version 1.0.1, its
    ``rouge-l`` F score of each pair. That package splits sentences on ``.`` and words
    on spaces, is case-sensitive, does not stem, and counts distinct words; an empty
    prediction, or one it cannot score, scores 0. ``rouge-score`` is Google's
    implementation with stemming, which scores the same pairs 0.5-5 points lower on
    Dolly; it is offered for comparison with papers that use it.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if implementation == "official":
        scores = [_official_rouge_l(pred, ref) for pred, ref in zip(predictions, references)]
    elif implementation == "rouge-score":
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    else:
        raise ValueError(f"Rouge-L implementation must be one of {ROUGE}, got {implementation!r}")
    return 100.0 * sum(scores) / max(len(scores), 1)


def _official_rouge_l(prediction: str, reference: str) -> float:
    from rouge import Rouge

    if not prediction:
        return 0.0
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))  # its LCS backtrack recurses once per word of a sentence pair
    try:
        return float(Rouge().get_scores([prediction], [reference])[0]["rouge-l"]["f"])
    except ValueError:  # "Hypothesis is empty." once split into sentences and words (e.g. only dots)
        return 0.0
    finally:
        sys.setrecursionlimit(limit)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The answer of a GSM8K-style text: after ``####`` if present, else the last number."""
    tail = text.split("####")[-1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    value = found[0] if "####" in text else found[-1]
    value = value.replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value


def gsm8k_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percent of predictions whose final number equals the reference's."""
    hits = sum(final_number(p) is not None and final_number(p) == final_number(r) for p, r in zip(predictions, references))
    return 100.0 * hits / max(len(references), 1)


@torch.no_grad()
def classification_metrics(module: torch.nn.Module, examples: Sequence[ClassifiedExample], batch_size: int,
                           pad_id: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (percent) of a sequence-classification model."""
    device = next(module.parameters()).device
    loss, hits = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate_classification(examples[i : i + batch_size], pad_id).items()}
        logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()  # (B, C)
        loss += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        hits += int((logits.argmax(-1) == batch["labels"]).sum())
    n = max(len(examples), 1)
    return loss / n, 100.0 * hits / n
