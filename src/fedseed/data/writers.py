"""Write examples back in each data set's own layout, so a partition can be handed to its owners.

``fedseed partition`` splits one data set the way an in-process run does and
writes each client's share with :func:`write_examples`; the file a client gets
loads (with the loader of the same data set) into exactly the examples, in the
same order, that the in-process run gives that client. Each writer is the inverse
of its loader's record converter.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from fedseed.data.errors import DataError
from fedseed.data.example import Example
from fedseed.data.loaders import SST2_LABEL_WORDS

SUFFIX = {"dolly": ".jsonl", "codealpaca": ".json", "gsm8k": ".jsonl", "sst2": ".tsv", "natural-instructions": ""}
_SST2_LABELS = {word: digit for digit, word in SST2_LABEL_WORDS.items()}


def write_examples(dataset: str, examples: Sequence[Example], path: Path, split: str = "train") -> Path:
    """Write ``examples`` to ``path`` (plus the data set's suffix) in ``dataset``'s layout; returns the path written.

    Natural Instructions is a folder (``tasks/<task>.json`` and the
    ``splits/default/<split>_tasks.txt`` list), every other data set one file.
    """
    out = path.with_name(path.name + SUFFIX[dataset])
    out.parent.mkdir(parents=True, exist_ok=True)
    if dataset == "dolly":
        _lines(out, ({"instruction": e.instruction, "context": e.input, "response": e.output, "category": e.category}
                     for e in examples))
    elif dataset == "gsm8k":
        _lines(out, ({"question": e.instruction, "answer": e.output} for e in examples))
    elif dataset == "codealpaca":
        rows = [{"instruction": e.instruction, "input": e.input, "output": e.output} for e in examples]
        out.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif dataset == "sst2":
        bad = [e.input for e in examples if "\t" in e.input or "\n" in e.input]
        if bad:
            raise DataError(f"an SST-2 sentence holds a tab or newline and cannot be written as TSV: {bad[0]!r:.60}")
        out.write_text("sentence\tlabel\n" + "".join(f"{e.input}\t{_SST2_LABELS[e.output]}\n" for e in examples),
                       encoding="utf-8")
    elif dataset == "natural-instructions":
        _natural_instructions(out, examples, split)
    else:
        raise DataError(f"`dataset` {dataset!r} has no writer")
    return out


def _lines(path: Path, records) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def _natural_instructions(folder: Path, examples: Sequence[Example], split: str) -> None:
    tasks: dict[str, list[Example]] = {}
    for e in examples:
        tasks.setdefault(e.category, []).append(e)
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    (folder / "splits" / "default").mkdir(parents=True, exist_ok=True)
    for task, members in tasks.items():
        definitions = {e.instruction for e in members}
        if len(definitions) != 1:
            raise DataError(f"task {task!r} has {len(definitions)} different definitions; one task, one definition")
        record = {"Definition": [members[0].instruction],
                  "Instances": [{"id": e.uid, "input": e.input, "output": [e.output]} for e in members]}
        (folder / "tasks" / f"{task}.json").write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    for name in ("train", "test"):
        listed = "".join(f"{task}\n" for task in tasks) if name == split else ""
        (folder / "splits" / "default" / f"{name}_tasks.txt").write_text(listed, encoding="utf-8")
