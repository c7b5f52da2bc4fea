"""The record every loader returns, whatever the data set's own field names are.

Keeping one record type means prompts, tokenisation and partitioning are written once
and never learn which data set they are looking at.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One instruction-following example.

    Parameters
    ----------
    instruction : str
        What the model is asked to do.
    input : str
        The context or task input; ``""`` when the task has none, which selects the
        no-input prompt template.
    output : str
        The target text: a response, a worked answer, or a label word (SST-2).
    category : str
        What partitioners and hold-out splits group by: the Dolly category, the NI
        task name, ``"gsm8k"``, ``"codealpaca"``, or the SST-2 label word.
    uid : str
        A stable id, so a partition or an evaluation can be traced back to its source
        line: ``"dolly-<line index>"``, the NI instance id (or ``"<task>-<index>"``).
    """

    instruction: str
    input: str
    output: str
    category: str
    uid: str
