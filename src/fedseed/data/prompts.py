"""Prompt templates that turn an :class:`Example` into model input text.

``alpaca`` is fedseed's own: one template for every data set keeps prompts
comparable across tasks; the prompt stops at ``### Response:\\n`` and the response
is tokenised separately, so the loss mask covers it exactly.

``fedkseed-dolly`` and ``fedkseed-ni`` are what the FedKSeed code (also Ferret's)
feeds the model, for the paper presets (docs/official-pipelines.md, section 2):
Dolly's template says "Write a response for the task request.", Natural
Instructions' is the Alpaca wording with an input block always; neither has a
newline after ``### Response:``, and the text is tokenised as one string
``prompt + response + eos`` with the loss masked over the prompt's own length.
This module does not tokenise.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedseed.data.example import Example


@dataclass(frozen=True)
class Template:
    with_input: str
    no_input: str | None  # None: the input block is always there, empty or not
    joint: bool  # tokenise prompt + response + eos as one text (the FedKSeed code's way), else each on its own


ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

TEMPLATES = {
    "alpaca": Template(ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, joint=False),
    # utils_data/llm_dataset.py, PROMPT_DICT (FedKSeed @ 3cec773; identical in Ferret)
    "fedkseed-dolly": Template(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response for the task request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
        "### Response:",
        "Below is an instruction that describes a task. Write a response for the task request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:",
        joint=True,
    ),
    # utils_data/natural_instruction_loader.py, LLMDataset (use_prompts=True)
    "fedkseed-ni": Template(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
        "### Input:\n{input}\n\n### Response:",
        None,
        joint=True,
    ),
}


def format_prompt(ex: Example, template: str = "alpaca") -> str:
    """The prompt for ``ex``, without the response.

    ``alpaca`` drops the input block when the input is empty or only whitespace,
    so the model never sees an empty ``### Input:`` section; ``fedkseed-dolly``
    drops it only when the input is empty (the official test is ``!= ""``).
    """
    t = TEMPLATES[template]
    has_input = bool(ex.input.strip()) if template == "alpaca" else ex.input != ""
    if has_input or t.no_input is None:
        return t.with_input.format(instruction=ex.instruction, input=ex.input)
    return t.no_input.format(instruction=ex.instruction)
