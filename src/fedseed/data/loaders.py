"""Read each supported data set from local files into a list of :class:`Example`.

Each loader knows one file format and maps its field names onto :class:`Example`;
:func:`load_examples` picks the loader (and, for folders, the split file) from a
data-set name. Loaders validate every record and raise :class:`DataError` naming the
file, the line (or record index for formats without lines) and the field, because a
bad record found mid-run would waste the run.

Loaders do not shuffle, partition or tokenise, and they never touch the network: a
``hub:<name>`` path goes through the optional Hugging Face ``datasets`` package.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from fedseed.data.errors import DataError
from fedseed.data.example import Example
from fedseed.locations import LocationError, resolve

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

DATASETS: tuple[str, ...] = ("dolly", "natural-instructions", "codealpaca", "gsm8k", "sst2")
SPLITS: tuple[str, ...] = ("train", "test")
HUB_PREFIX = "hub:"

SST2_INSTRUCTION = (
    "Classify the sentiment of the following movie review as positive or negative."
)
SST2_LABEL_WORDS: Mapping[str, str] = {"0": "negative", "1": "positive"}
_SST2_HEADER = "sentence\tlabel"


# ---------------------------------------------------------------------------
# shared helpers


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"`split` must be one of {list(SPLITS)}, got {split!r}")


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise DataError(f"`dataset` must be one of {list(DATASETS)}, got {dataset!r}")


def _existing_file(path: PathLike) -> Path:
    """Return ``path`` as a Path, or say clearly why it cannot be read."""
    p = Path(path)
    if p.is_file():
        return p
    problem = "is a directory, not a file" if p.is_dir() else "does not exist"
    raise DataError(
        f"data file {p} {problem} (resolved to {p.resolve()}); check the `path` "
        f"setting: relative paths are resolved from the working directory {Path.cwd()}"
    )


def _read_text(path: Path) -> str:
    """The file as text; a ``.gz`` file is decompressed on the way (the quickstart's sample is)."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); "
            "re-save the file as UTF-8"
        ) from exc
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot be read ({exc}); is it a complete, uncompressed or gzip file?") from exc


def _load_json(path: Path) -> Any:
    """Parse a whole JSON file; Python's json accepts the literal NaN some NI files hold."""
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
        ) from exc


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each non-blank line of a JSONL file.

    Lines are split on ``\\n`` only (not ``str.splitlines``), because JSON strings may
    legally hold raw U+2028 and similar separators that are not record boundaries.
    """
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                "each line of a JSONL file must hold exactly one JSON object"
            ) from exc
        if not isinstance(record, dict):
            raise DataError(
                f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
            )
        yield lineno, record


def _field(record: Mapping[str, Any], name: str, where: str, *, empty_ok: bool = False) -> str:
    """Return the string field ``name``; the error names ``where`` and the field."""
    if name not in record:
        raise DataError(
            f"{where}: missing field `{name}` (fields present: {sorted(record)})"
        )
    value = record[name]
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field `{name}` must be a string, got {type(value).__name__} {value!r:.60}"
        )
    if not empty_ok and not value.strip():
        raise DataError(f"{where}: field `{name}` is empty; fill it in or remove the record")
    return value


# ---------------------------------------------------------------------------
# record converters, shared by the local loaders and the Hub path


def _dolly_example(record: Mapping[str, Any], uid: str, where: str) -> Example:
    return Example(
        instruction=_field(record, "instruction", where),
        input=_field(record, "context", where, empty_ok=True),
        output=_field(record, "response", where, empty_ok=True),
        category=_field(record, "category", where),
        uid=uid,
    )


def _alpaca_example(record: Mapping[str, Any], uid: str, where: str) -> Example:
    return Example(
        instruction=_field(record, "instruction", where),
        input=_field(record, "input", where, empty_ok=True),
        output=_field(record, "output", where, empty_ok=True),
        category="codealpaca",
        uid=uid,
    )


def _gsm8k_example(record: Mapping[str, Any], uid: str, where: str) -> Example:
    answer = _field(record, "answer", where)
    if "####" not in answer:
        # The exact-answer metric reads the number after "####"; without it the
        # example can be trained on but never scored.
        raise DataError(
            f"{where}: field `answer` has no '#### <number>' final line; "
            "GSM8K answers must end with it"
        )
    return Example(
        instruction=_field(record, "question", where),
        input="",
        output=answer,
        category="gsm8k",
        uid=uid,
    )


def _sst2_example(sentence: str, label: str, uid: str, where: str) -> Example:
    if label not in SST2_LABEL_WORDS:
        raise DataError(
            f"{where}: field `label` must be one of {sorted(SST2_LABEL_WORDS)}, got {label!r}"
        )
    if not sentence.strip():
        raise DataError(f"{where}: field `sentence` is empty")
    word = SST2_LABEL_WORDS[label]
    return Example(SST2_INSTRUCTION, sentence.strip(), word, word, uid)


# ---------------------------------------------------------------------------
# local loaders


def load_dolly(path: PathLike) -> list[Example]:
    """Load Dolly-15K JSONL (``instruction`` / ``context`` / ``response`` / ``category``).

    Parameters
    ----------
    path : str or PathLike
        The ``.jsonl`` file.

    Returns
    -------
    list of Example
        In file order; ``uid`` is ``"dolly-<0-based line index>"`` so it survives
        re-partitioning. ``context`` becomes ``input`` and may be empty.
    """
    file = _existing_file(path)
    return [
        _dolly_example(record, f"dolly-{lineno - 1}", f"{file}:{lineno}")
        for lineno, record in _iter_jsonl(file)
    ]


def _read_task_list(path: Path) -> list[str]:
    """Task names from a split file, one per line, blank lines ignored, order kept."""
    names = [line.strip() for line in _read_text(_existing_file(path)).split("\n")]
    return list(dict.fromkeys(name for name in names if name))


def _ni_definition(task: Mapping[str, Any], where: str) -> str:
    definition = task.get("Definition")
    if isinstance(definition, str):
        return definition
    if isinstance(definition, list) and definition and all(isinstance(d, str) for d in definition):
        return "\n".join(definition)
    raise DataError(
        f"{where}: field `Definition` must be a string or a non-empty list of strings, "
        f"got {definition!r:.60}"
    )


def _ni_output(instance: Mapping[str, Any], where: str) -> str:
    """The first reference output; NI lists several acceptable outputs per instance."""
    outputs = instance.get("output")
    if isinstance(outputs, str):
        outputs = [outputs]
    if not isinstance(outputs, list) or not outputs or not isinstance(outputs[0], str):
        raise DataError(
            f"{where}: field `output` must be a non-empty list of strings, got {outputs!r:.60}"
        )
    return outputs[0]


def _load_ni_task(path: Path, task: str, max_per_task: int | None) -> list[Example]:
    data = _load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object (an NI task), got {type(data).__name__}")
    definition = _ni_definition(data, str(path))
    instances = data.get("Instances")
    if not isinstance(instances, list) or not instances:
        raise DataError(f"{path}: field `Instances` must be a non-empty list")
    examples = []
    for index, instance in enumerate(instances[:max_per_task]):
        where = f"{path}: Instances[{index}]"
        if not isinstance(instance, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(instance).__name__}")
        # Files read at the pinned commit have no instance ids; make a stable one.
        uid = instance.get("id")
        examples.append(
            Example(
                instruction=definition,
                input=_field(instance, "input", where, empty_ok=True),
                output=_ni_output(instance, where),
                category=task,
                uid=uid if isinstance(uid, str) and uid else f"{task}-{index}",
            )
        )
    return examples


def load_natural_instructions(
    root: PathLike, split: str, max_per_task: int | None = None
) -> list[Example]:
    """Load the Natural Instructions v2 tasks of one official split that are present.

    Parameters
    ----------
    root : str or PathLike
        Folder holding ``tasks/<task>.json`` and ``splits/default/{train,test}_tasks.txt``.
    split : {"train", "test"}
        Which default split list to read. The lists name hundreds of tasks; a local
        copy usually holds a subset, so the tasks listed *and* present are used (the
        count is logged), and having none of them is an error rather than an empty set.
    max_per_task : int, optional
        Keep only the first ``max_per_task`` instances of each task (file order, so no
        randomness), to bound the size of large tasks.

    Returns
    -------
    list of Example
        Tasks in split-file order. ``instruction`` is the task Definition, ``output``
        the first reference output, ``category`` the task name.
    """
    _check_split(split)
    if max_per_task is not None and max_per_task < 1:
        raise DataError(f"`max_per_task` must be >= 1 or None, got {max_per_task}")
    root_dir = Path(root)
    tasks_dir = root_dir / "tasks"
    if not tasks_dir.is_dir():
        raise DataError(
            f"{root_dir} has no tasks/ folder (resolved to {root_dir.resolve()}); the "
            "natural-instructions `path` must be the folder holding tasks/ and splits/default/"
        )
    split_file = root_dir / "splits" / "default" / f"{split}_tasks.txt"
    listed = _read_task_list(split_file)
    present = [task for task in listed if (tasks_dir / f"{task}.json").is_file()]
    if not present:
        raise DataError(
            f"none of the {len(listed)} tasks listed in {split_file} has a file in "
            f"{tasks_dir}; add the task files or use the matching split list"
        )
    logger.info(
        "natural-instructions %s: using %d of the %d tasks listed in %s",
        split, len(present), len(listed), split_file,
    )
    examples: list[Example] = []
    for task in present:
        examples.extend(_load_ni_task(tasks_dir / f"{task}.json", task, max_per_task))
    return examples


def load_alpaca(path: PathLike) -> list[Example]:
    """Load an Alpaca-style JSON list of ``{instruction, input, output}`` (CodeAlpaca).

    Errors name the record index, since a JSON list has no line per record.
    Records are kept as they are: an empty ``output`` (two in CodeAlpaca-2k) stays,
    and trains the model to stop at once; filter before tokenising if unwanted.
    ``category`` is ``"codealpaca"`` and ``uid`` is ``"codealpaca-<index>"``.
    """
    file = _existing_file(path)
    data = _load_json(file)
    if not isinstance(data, list):
        raise DataError(
            f"{file}: expected a JSON list of {{instruction, input, output}} objects, "
            f"got {type(data).__name__}"
        )
    examples = []
    for index, record in enumerate(data):
        where = f"{file}: record {index}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        examples.append(_alpaca_example(record, f"codealpaca-{index}", where))
    return examples


def load_gsm8k(path: PathLike) -> list[Example]:
    """Load GSM8K JSONL (``question`` / ``answer``).

    ``output`` is the whole worked answer, ending in ``#### <number>``, so the model
    learns to show its work and the metric can read the final number.
    ``uid`` is ``"gsm8k-<file stem>-<line index>"``.
    """
    file = _existing_file(path)
    return [
        _gsm8k_example(record, f"gsm8k-{file.stem}-{lineno - 1}", f"{file}:{lineno}")
        for lineno, record in _iter_jsonl(file)
    ]


def load_sst2(path: PathLike) -> list[Example]:
    """Load a GLUE SST-2 TSV file (``sentence<TAB>label``, optional header line).

    The label becomes a word (``0`` -> ``"negative"``, ``1`` -> ``"positive"``) used as
    both ``output`` and ``category``, so a causal LM is trained to write the word and
    a Dirichlet partition over categories gives label skew.
    ``uid`` is ``"sst2-<file stem>-<row index>"``.
    """
    file = _existing_file(path)
    examples: list[Example] = []
    for lineno, line in enumerate(_read_text(file).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip() or (lineno == 1 and line.strip() == _SST2_HEADER):
            continue
        where = f"{file}:{lineno}"
        sentence, tab, label = line.rpartition("\t")
        if not tab:
            raise DataError(f"{where}: expected 'sentence<TAB>label', found no tab")
        uid = f"sst2-{file.stem}-{len(examples)}"
        examples.append(_sst2_example(sentence, label.strip(), uid, where))
    return examples


# ---------------------------------------------------------------------------
# dispatch by data-set name


def _split_file(path: Path, files: Mapping[str, str], split: str) -> Path:
    """A file path is used as is; a folder gives the file for ``split``."""
    return path / files[split] if path.is_dir() else path


def _load_local(dataset: str, path: Path, split: str) -> list[Example]:
    loaders: dict[str, Callable[[], list[Example]]] = {
        "dolly": lambda: load_dolly(path),
        "natural-instructions": lambda: load_natural_instructions(path, split),
        "codealpaca": lambda: load_alpaca(path),
        "gsm8k": lambda: load_gsm8k(
            _split_file(path, {"train": "train.jsonl", "test": "test.jsonl"}, split)
        ),
        # "test" means dev.tsv: GLUE's own test labels are hidden, so dev is the
        # labelled evaluation split used in practice.
        "sst2": lambda: load_sst2(
            _split_file(path, {"train": "train.tsv", "test": "dev.tsv"}, split)
        ),
    }
    return loaders[dataset]()


def load_examples(dataset: str, path: PathLike, split: str) -> list[Example]:
    """Load ``dataset`` from ``path`` for ``split``; the one entry point runners call.

    Parameters
    ----------
    dataset : {"dolly", "natural-instructions", "codealpaca", "gsm8k", "sst2"}
        Which loader to use.
    path : str or PathLike
        A local file or folder (``.gz`` files are decompressed), ``"python:<package>/<path>"``
        for one shipped inside an installed package, or ``"hub:<repo id>"`` for the
        Hugging Face Hub (needs the optional ``datasets`` package).
    split : {"train", "test"}
        Picks the file when ``path`` is a folder:

        * natural-instructions: the folder's ``splits/default/<split>_tasks.txt``;
        * gsm8k: ``train.jsonl`` / ``test.jsonl`` (a file path is read as is);
        * sst2: ``train.tsv`` / ``dev.tsv`` -- "test" means **dev.tsv**, the labelled
          evaluation split used in practice (GLUE's test labels are hidden); a file
          path is read as is;
        * dolly, codealpaca: single files with no split; the whole file is returned
          whatever ``split`` is, and the evaluation set is carved out with
          :func:`fedseed.data.holdout_split`.

    Returns
    -------
    list of Example
    """
    _check_split(split)
    _check_dataset(dataset)
    text = os.fspath(path)
    if text.startswith(HUB_PREFIX):
        return load_from_hub(dataset, text[len(HUB_PREFIX):], split)
    try:
        local = resolve(text)
    except LocationError as exc:
        raise DataError(f"data `path` {exc}") from None
    return _load_local(dataset, Path(local), split)


# ---------------------------------------------------------------------------
# optional Hugging Face Hub path (not exercised offline)

# The Hub copies name their evaluation splits differently from the local files.
_HUB_SPLITS: Mapping[str, Mapping[str, str]] = {
    "dolly": {"train": "train", "test": "train"},
    "codealpaca": {"train": "train", "test": "train"},
    "natural-instructions": {"train": "train", "test": "test"},
    "gsm8k": {"train": "train", "test": "test"},
    "sst2": {"train": "train", "test": "validation"},
}


def _hub_example(dataset: str, row: Mapping[str, Any], index: int, where: str) -> Example:
    """Map one Hub row onto Example, using the same checks as the local loaders."""
    if dataset == "dolly":
        return _dolly_example(row, f"dolly-{index}", where)
    if dataset == "codealpaca":
        return _alpaca_example(row, f"codealpaca-{index}", where)
    if dataset == "gsm8k":
        return _gsm8k_example(row, f"gsm8k-{index}", where)
    if dataset == "sst2":
        sentence, label = str(row.get("sentence", "")), str(row.get("label"))
        return _sst2_example(sentence, label, f"sst2-{index}", where)
    # natural-instructions, in the flattened layout of e.g. Muennighoff/natural-instructions
    task = _field(row, "task_name", where)
    uid = row.get("id")
    return Example(
        instruction=_field(row, "definition", where),
        input=_field(row, "inputs", where, empty_ok=True),
        output=_field(row, "targets", where),
        category=task,
        uid=uid if isinstance(uid, str) and uid else f"{task}-{index}",
    )


def load_from_hub(dataset: str, name: str, split: str) -> list[Example]:
    """Load ``dataset`` from the Hugging Face Hub repo ``name``, ``"repo"`` or ``"repo:config"`` (needs ``datasets``).

    Kept for users with Hub access; the project's tests use local files only.
    """
    _check_split(split)
    _check_dataset(dataset)
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"`path` = 'hub:{name}' needs the `datasets` package, which is not "
            "installed: `pip install datasets`, or download the data and give a local path"
        ) from exc
    hub_split = _HUB_SPLITS[dataset][split]
    repo, _, subset = name.partition(":")  # "openai/gsm8k:main": the Hub data set's config name after a colon
    rows = datasets.load_dataset(repo, subset or None, split=hub_split)
    return [
        _hub_example(dataset, row, index, f"hub:{name}[{hub_split}] row {index}")
        for index, row in enumerate(rows)
    ]
