"""The Alpaca prompt template that turns an :class:`Example` into model input text.

One template for every data set keeps prompts comparable across tasks and lets
training and evaluation share it. The prompt stops at ``### Response:\\n``: the
response is tokenised separately so the loss mask can cover it exactly. This module
does not tokenise.
"""

from __future__ import annotations

from fedseed.data.example import Example

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
"""The standard Alpaca template for examples with an input (context)."""

ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
"""The standard Alpaca template for examples without an input."""


def format_prompt(ex: Example) -> str:
    """Return the prompt for ``ex``, without the response.

    An input that is empty or only whitespace selects :data:`ALPACA_PROMPT_NO_INPUT`,
    as in Alpaca, so the model never sees an empty ``### Input:`` section.
    """
    if ex.input.strip():
        return ALPACA_PROMPT.format(instruction=ex.instruction, input=ex.input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=ex.instruction)
