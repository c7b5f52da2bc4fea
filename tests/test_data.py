"""Tests for fedseed.data on the real files in ../shared (loaders, prompts, tokenisation, partitions)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DOLLY as DOLLY_SAMPLE, STORIES, shared
from fedseed.data import (
    ALPACA_PROMPT,
    IGNORE_INDEX,
    DataError,
    Example,
    Partition,
    TokenizedExample,
    collate,
    format_prompt,
    holdout_split,
    load_alpaca,
    load_dolly,
    load_examples,
    load_gsm8k,
    load_natural_instructions,
    load_sst2,
    partition_by_key,
    partition_dirichlet,
    partition_iid,
    tokenize_examples,
)

TOKENIZER = STORIES

# Instance counts from the table in ../shared/data/natural-instructions/README.md.
NI_TRAIN_COUNTS = {
    "task062_bigbench_repeat_copy_logic": 29,
    "task1146_country_capital": 231,
    "task1149_item_check_edible": 119,
    "task1191_food_veg_nonveg": 101,
    "task1316_remove_duplicates_string": 200,
    "task1331_reverse_array": 196,
    "task1332_check_leap_year": 200,
    "task1404_date_conversion": 196,
}
NI_TEST_COUNTS = {
    "task1155_bard_analogical_reasoning_trash_or_treasure": 546,
    "task1158_bard_analogical_reasoning_manipulating_items": 376,
    "task1159_bard_analogical_reasoning_containers": 698,
}


@pytest.fixture(scope="module")
def dolly() -> list[Example]:
    return load_dolly(shared("data/dolly/databricks-dolly-15k.jsonl"))


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(TOKENIZER)


def _ex(instruction: str = "Say hi.", input: str = "", output: str = "hi there") -> Example:
    return Example(instruction, input, output, "test", "t-0")


# --------------------------------------------------------------------------- loaders


def test_dolly_counts_and_categories(dolly: list[Example]) -> None:
    assert len(dolly) == 15011
    counts = Counter(ex.category for ex in dolly)
    assert len(counts) == 8
    assert counts["summarization"] == 1188
    assert counts["open_qa"] == 3742
    assert dolly[0].uid == "dolly-0"
    assert len({ex.uid for ex in dolly}) == len(dolly)


def test_natural_instructions_train_and_test_counts() -> None:
    train = load_natural_instructions(shared("data/natural-instructions"), "train")
    test = load_examples("natural-instructions", shared("data/natural-instructions"), "test")
    assert Counter(ex.category for ex in train) == NI_TRAIN_COUNTS
    assert Counter(ex.category for ex in test) == NI_TEST_COUNTS
    assert len(train) == 1272 and len(test) == 1620
    # Test-split files have no instance ids: the loader makes "<task>-<index>".
    first_test = next(ex for ex in test if ex.category.startswith("task1155"))
    assert first_test.uid == "task1155_bard_analogical_reasoning_trash_or_treasure-0"
    assert first_test.input == "crumbs : trash. remote : ?" and first_test.output == "treasure"
    assert first_test.instruction.startswith("Two analogies that relate items to whether")


def test_natural_instructions_fields_and_max_per_task() -> None:
    train = load_natural_instructions(shared("data/natural-instructions"), "train", max_per_task=5)
    assert len(train) == 5 * 8
    reverse = [ex for ex in train if ex.category == "task1331_reverse_array"]
    assert reverse[0].uid.startswith("task1331-")
    assert json.loads(reverse[0].output) == json.loads(reverse[0].input)[::-1]
    assert reverse[0].instruction.startswith("In this task, you are given a list of integers")


def test_natural_instructions_no_listed_task_present(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    (tmp_path / "splits" / "default").mkdir(parents=True)
    (tmp_path / "splits" / "default" / "train_tasks.txt").write_text("task999_missing\n")
    with pytest.raises(DataError, match="none of the 1 tasks listed"):
        load_natural_instructions(tmp_path, "train")


def test_gsm8k_counts_folder_and_file() -> None:
    train = load_examples("gsm8k", shared("data/gsm8k"), "train")
    test = load_examples("gsm8k", shared("data/gsm8k"), "test")
    assert (len(train), len(test)) == (7473, 1319)
    assert len(load_gsm8k(shared("data/gsm8k") / "test.jsonl")) == 1319
    assert all(ex.output.splitlines()[-1].startswith("#### ") for ex in test)
    assert test[0].output.endswith("#### 18") and test[0].category == "gsm8k"


def test_sst2_counts_and_label_words() -> None:
    train = load_examples("sst2", shared("data/sst2"), "train")
    dev = load_examples("sst2", shared("data/sst2"), "test")  # "test" is dev.tsv by design
    assert (len(train), len(dev)) == (67349, 872)
    assert len(load_sst2(shared("data/sst2") / "test.tsv")) == 1821
    assert {ex.output for ex in dev} == {"negative", "positive"}
    assert all(ex.category == ex.output for ex in dev)
    assert dev[0].input == "it 's a charming and often affecting journey ." and dev[0].output == "positive"


def test_codealpaca_count() -> None:
    examples = load_examples("codealpaca", shared("data/codealpaca") / "code_alpaca_2k.json", "train")
    assert len(examples) == 2017
    assert {ex.category for ex in examples} == {"codealpaca"}
    assert examples[0].input == "dataList = [3, 9, 3, 5, 7, 9, 5]"


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"instruction": "a", "context": "", "response": "b", "category": "c"})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{good}\n{{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        load_dolly(path)
    path.write_text(f"{good}\n" + json.dumps({"instruction": "a", "context": ""}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field `response`"):
        load_dolly(path)


def test_sst2_bad_label_names_line(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\ngood film\t1\nbad film\t7\n")
    with pytest.raises(DataError, match=r"train\.tsv:3: field `label`"):
        load_sst2(path)


def test_missing_file_and_bad_names(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        load_dolly(missing)
    with pytest.raises(DataError, match="natural-instructions"):
        load_examples("imagenet", missing, "train")
    with pytest.raises(DataError, match="`split`"):
        load_examples("dolly", DOLLY_SAMPLE, "validation")
    with pytest.raises(DataError, match="`datasets` package"):
        load_examples("dolly", "hub:databricks/databricks-dolly-15k", "train")
    with pytest.raises(DataError):
        load_alpaca(DOLLY_SAMPLE)  # JSONL is not a JSON list


# --------------------------------------------------------------------------- prompts


def test_format_prompt_with_and_without_input() -> None:
    with_input = format_prompt(_ex(input="some context"))
    assert with_input == ALPACA_PROMPT.format(instruction="Say hi.", input="some context")
    assert "### Input:\nsome context\n\n### Response:\n" in with_input
    without = format_prompt(_ex(input="  "))
    assert "### Input:" not in without
    assert without.endswith("### Instruction:\nSay hi.\n\n### Response:\n")


# --------------------------------------------------------------------------- tokenisation


def test_loss_mask_covers_exactly_response_and_eos(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ex = _ex(input="ctx", output="Once upon a time")
    [item], stats = tokenize_examples([ex], tokenizer, max_length=512)
    prompt_ids = [tokenizer.bos_token_id] + tokenizer(format_prompt(ex), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(ex.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert item.input_ids == tuple(prompt_ids + response_ids)
    assert item.prompt_length == len(prompt_ids)
    assert item.labels == (IGNORE_INDEX,) * len(prompt_ids) + tuple(response_ids)
    assert item.labels[-1] == 2 and item.input_ids[0] == 1
    assert stats.total == stats.kept == 1 and stats.truncated == stats.dropped == 0


def test_truncation_and_drop_counts(tokenizer) -> None:  # type: ignore[no-untyped-def]
    short = _ex(output="hi")
    long = _ex(output="Once upon a time there was a little girl named Lily. " * 3)
    [probe], _ = tokenize_examples([short], tokenizer, max_length=10_000)
    p = probe.prompt_length  # same instruction -> same prompt length for all three
    huge_prompt = _ex(instruction="word " * 200)
    items, stats = tokenize_examples([short, long, huge_prompt], tokenizer, max_length=p + 3)
    assert (stats.total, stats.kept, stats.truncated, stats.dropped) == (3, 2, 1, 1)
    assert [len(it.input_ids) for it in items] == [len(probe.input_ids), p + 3]
    cut = items[1]
    assert cut.labels[: cut.prompt_length] == (IGNORE_INDEX,) * p
    assert tokenizer.eos_token_id not in cut.labels  # eos was cut with the response tail
    # A prompt exactly filling max_length leaves no response token: dropped.
    assert tokenize_examples([short], tokenizer, max_length=p)[1].dropped == 1
    with pytest.raises(DataError, match="max_length"):
        tokenize_examples([short], tokenizer, max_length=1)


def test_collate_shapes_and_padding() -> None:
    a = TokenizedExample((1, 5, 6, 7, 2), (IGNORE_INDEX, IGNORE_INDEX, 6, 7, 2), 2)
    b = TokenizedExample((1, 9, 2), (IGNORE_INDEX, 9, 2), 1)
    batch = collate([a, b], pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for tensor in batch.values():
        assert tensor.shape == (2, 5) and tensor.dtype == torch.long
    assert batch["input_ids"][1].tolist() == [1, 9, 2, 0, 0]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 9, 2, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["labels"][0].tolist() == list(a.labels)
    with pytest.raises(DataError):
        collate([], pad_id=0)


# --------------------------------------------------------------------------- partitions


def _assert_exact_cover(partition: Partition, n: int) -> None:
    flat = [i for client in partition.clients for i in client]
    assert sorted(flat) == list(range(n))


def _label_skew(partition: Partition, labels: Sequence[str]) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    names = sorted(set(labels))
    codes = np.array([names.index(label) for label in labels])
    global_mix = np.bincount(codes, minlength=len(names)) / len(codes)
    distances = []
    for client in partition.clients:
        mix = np.bincount(codes[list(client)], minlength=len(names)) / len(client)
        distances.append(0.5 * np.abs(mix - global_mix).sum())
    return float(np.mean(distances))


def test_dirichlet_deterministic_and_exact_cover(dolly: list[Example]) -> None:
    labels = [ex.category for ex in dolly]
    first = partition_dirichlet(labels, num_clients=20, alpha=0.5, seed=7)
    assert first == partition_dirichlet(labels, num_clients=20, alpha=0.5, seed=7)
    assert first != partition_dirichlet(labels, num_clients=20, alpha=0.5, seed=8)
    assert first.num_clients == 20 and first.method == "dirichlet" and first.seed == 7
    assert min(len(c) for c in first.clients) >= 1
    _assert_exact_cover(first, len(labels))
    with_min = partition_dirichlet(labels, num_clients=20, alpha=0.1, seed=7, min_size=50)
    assert min(len(c) for c in with_min.clients) >= 50


def test_dirichlet_small_alpha_is_more_skewed(dolly: list[Example]) -> None:
    labels = [ex.category for ex in dolly]
    skewed = _label_skew(partition_dirichlet(labels, 20, alpha=0.1, seed=0), labels)
    near_iid = _label_skew(partition_dirichlet(labels, 20, alpha=100.0, seed=0), labels)
    assert skewed > 0.4  # most of each client's mass sits on few categories
    assert near_iid < 0.1
    assert skewed > 4 * near_iid


def test_dirichlet_argument_errors() -> None:
    labels = ["a", "b"] * 5
    with pytest.raises(DataError, match="`num_clients` must be >= 1"):
        partition_dirichlet(labels, 0, 0.5, seed=0)
    with pytest.raises(DataError, match="`alpha`"):
        partition_dirichlet(labels, 2, 0.0, seed=0)
    with pytest.raises(DataError, match="`num_clients` = 11 is more than the 10"):
        partition_dirichlet(labels, 11, 0.5, seed=0)
    with pytest.raises(DataError, match="after 100 draws"):
        partition_dirichlet(labels, 5, 0.01, seed=0, min_size=2)


def test_iid_partition() -> None:
    part = partition_iid(103, num_clients=10, seed=3)
    assert part == partition_iid(103, num_clients=10, seed=3)
    assert part != partition_iid(103, num_clients=10, seed=4)
    assert sorted(len(c) for c in part.clients) == [10] * 7 + [11] * 3
    _assert_exact_cover(part, 103)
    with pytest.raises(DataError, match="more than the 5"):
        partition_iid(5, num_clients=6, seed=0)


def test_by_key_one_client_per_task() -> None:
    train = load_natural_instructions(shared("data/natural-instructions"), "train")
    part = partition_by_key([ex.category for ex in train], seed=0)
    assert part.num_clients == 8 and part.method == "by-key"
    _assert_exact_cover(part, len(train))
    tasks = [{train[i].category for i in client} for client in part.clients]
    assert all(len(t) == 1 for t in tasks)
    assert [t.pop() for t in tasks] == sorted(NI_TRAIN_COUNTS)
    assert [len(c) for c in part.clients] == [NI_TRAIN_COUNTS[k] for k in sorted(NI_TRAIN_COUNTS)]


def test_partition_json_round_trip() -> None:
    part = partition_iid(20, num_clients=3, seed=1)
    assert Partition.from_json(json.loads(json.dumps(part.to_json()))) == part
    with pytest.raises(DataError, match="assigned to both client 0 and client 1"):
        Partition.from_json({"method": "iid", "seed": 1, "clients": [[0, 1], [1]]})
    with pytest.raises(DataError, match="`seed`"):
        Partition.from_json({"method": "iid", "seed": "1", "clients": []})


def test_holdout_split(dolly: list[Example]) -> None:
    train, held = holdout_split(dolly, "summarization")
    assert len(held) == 1188 and len(train) == 15011 - 1188
    assert {ex.category for ex in held} == {"summarization"}
    assert "summarization" not in {ex.category for ex in train}
    with pytest.raises(DataError, match="categories present: .*'brainstorming'"):
        holdout_split(dolly, "poetry")


# --------------------------------------------------------------------------- the shipped sample


def test_shipped_dolly_sample_is_the_quickstart_subset() -> None:
    """4,000 training examples (the quickstart's subset of Dolly) and the 303 summarization ones that fit 512 tokens."""
    examples = load_examples("dolly", "python:fedseed/assets/dolly-quickstart.jsonl.gz", "train")
    train, heldout = holdout_split(examples, "summarization")
    assert (len(train), len(heldout)) == (4000, 303)
    assert len({ex.category for ex in train}) == 7
    assert all(ex.instruction and ex.category for ex in examples)


def test_gzip_files_load_and_corrupt_ones_are_named(tmp_path: Path) -> None:
    import gzip

    good = tmp_path / "d.jsonl.gz"
    record = '{"instruction": "Say hi", "context": "", "response": "hi", "category": "open_qa"}\n'
    good.write_bytes(gzip.compress(record.encode()))
    assert load_dolly(good)[0].output == "hi"
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(record.encode())[:20])
    with pytest.raises(DataError, match="bad.jsonl.gz: cannot be read"):
        load_dolly(bad)
    with pytest.raises(DataError, match="not installed"):
        load_examples("dolly", "python:no_such_package_xyz/data.jsonl", "train")
