"""Data for fedseed: loaders, the prompt template, tokenisation and partitioners.

Everything here takes plain arguments (paths, seeds, counts), never a config object,
and raises :class:`DataError` with the file, line and field when data is wrong.
"""

from fedseed.data.errors import DataError
from fedseed.data.example import Example
from fedseed.data.loaders import (
    DATASETS,
    load_alpaca,
    load_dolly,
    load_examples,
    load_from_hub,
    load_gsm8k,
    load_natural_instructions,
    load_sst2,
)
from fedseed.data.partition import (
    Partition,
    holdout_split,
    partition_by_key,
    partition_dirichlet,
    partition_iid,
)
from fedseed.data.prompts import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, TEMPLATES, format_prompt
from fedseed.data.tokenize import (
    IGNORE_INDEX,
    ClassifiedExample,
    collate_classification,
    tokenize_classification,
    TokenizedExample,
    TruncationStats,
    collate,
    tokenize_examples,
)

__all__ = [
    "ClassifiedExample",
    "collate_classification",
    "tokenize_classification",
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "TEMPLATES",
    "DATASETS",
    "IGNORE_INDEX",
    "DataError",
    "Example",
    "Partition",
    "TokenizedExample",
    "TruncationStats",
    "collate",
    "format_prompt",
    "holdout_split",
    "load_alpaca",
    "load_dolly",
    "load_examples",
    "load_from_hub",
    "load_gsm8k",
    "load_natural_instructions",
    "load_sst2",
    "partition_by_key",
    "partition_dirichlet",
    "partition_iid",
    "tokenize_examples",
]
