"""What the FedKSeed code (also Ferret's) keeps of Natural Instructions before training.

For the paper presets (``data.subsample = "fedkseed-ni"``); the facts and where they
come from are in docs/official-pipelines.md, section 3. Per task, in split-file
order: instances whose ``input`` has 1024 characters or more are dropped; a training
task left with fewer than 20 is skipped, the others keep 20% of their instances; a
test task left with more than 20 keeps 2% of them, at least 20. The draws are the
official ones: ``numpy.random.choice(instances, k, replace=False)`` on the legacy
global generator seeded with the run seed, which is ``permutation(n)[:k]``; the
training tasks draw first, and the test tasks are drawn from a freshly seeded
generator, as the official final evaluation reseeds before it rebuilds its test set.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby

import numpy as np

from fedseed.data.example import Example

MAX_INPUT_CHARS = 1024  # the official --max_length, reused as a character limit on `input`
MIN_TRAIN_INSTANCES = 20
TRAIN_FRACTION = 0.2
TEST_FRACTION = 0.02
TEST_MIN = 20


def fedkseed_natural_instructions(examples: Sequence[Example], split: str, seed: int) -> list[Example]:
    """The instances the official code trains (``split="train"``) or evaluates (``"test"``) on, task by task."""
    rng = np.random.RandomState(seed)
    kept: list[Example] = []
    for _, task in groupby(examples, key=lambda ex: ex.category):
        items = [ex for ex in task if len(ex.input) < MAX_INPUT_CHARS]
        if split == "train":
            if len(items) < MIN_TRAIN_INSTANCES:
                continue
            k = int(len(items) * TRAIN_FRACTION)
        elif len(items) > TEST_MIN:
            k = max(TEST_MIN, int(TEST_FRACTION * len(items)))
        else:
            kept += items
            continue
        kept += [items[i] for i in rng.permutation(len(items))[:k]]
    return kept
