"""Golden facts of the official pipelines, which the paper presets reproduce.

Each expected value says where it comes from: a file and function of the
FedKSeed code (zhenqincn/FedKSeed @ 3cec773, the same files as the FederatedScope
``FedKSeed`` branch; Ferret's ``utils_data`` is identical) or a computation that
code performs. docs/official-pipelines.md holds the facts with their sources.
"""

from __future__ import annotations

import tomllib

import numpy as np
import pytest

from conftest import REPO, STORIES, shared
from fedseed.config import load_config
from fedseed.data import Example, format_prompt, holdout_split, load_dolly, partition_dirichlet, tokenize_examples
from fedseed.data.subsample import fedkseed_natural_instructions
from fedseed.eval import rouge_l

# evaluations.py, rouge_score(): rouge==1.0.1, Rouge().get_scores([hyp], [ref])[0]["rouge-l"]["f"];
# an empty hypothesis, or one the package refuses (ValueError), scores 0.0. Values computed with that package.
ROUGE_PAIRS = [
    ("the cat the cat", "the cat", 0.999999995),  # distinct words: a repeat adds nothing
    ("The cat", "the cat", 0.4999999950000001),  # case-sensitive
    ("cats sat", "cat sat", 0.4999999950000001),  # no stemming
    ("Paris.", "Paris", 0.999999995),  # sentences split on "."
    ("a b. ", "a b", 0.7999999952000001),  # the stray " " after the dot is an empty word
    ("...", "Paris", 0.0),  # ValueError("Hypothesis is empty.") -> 0.0
    ("", "Paris", 0.0),  # empty decoded hypothesis -> 0.0
]


def test_official_rouge_l_is_the_fedkseed_code_s_score():
    for pred, ref, expected in ROUGE_PAIRS:
        assert rouge_l([pred], [ref]) == pytest.approx(100 * expected, abs=1e-9), (pred, ref)
    preds, refs, values = zip(*ROUGE_PAIRS)
    assert rouge_l(list(preds), list(refs)) == pytest.approx(100 * np.mean(values))  # a plain mean, in percent


def test_rouge_score_implementation_differs_where_it_stems_and_lowercases():
    assert rouge_l(["cats sat"], ["cat sat"], "rouge-score") == pytest.approx(100.0)
    assert rouge_l(["The cat"], ["the cat"], "rouge-score") == pytest.approx(100.0)
    with pytest.raises(ValueError, match="one of"):
        rouge_l(["a"], ["a"], "bleu")


def test_long_sentences_are_scored_not_a_recursion_error():
    words = " ".join(f"w{i}" for i in range(1500))  # one 1,500-word sentence: rouge 1.0.1 recurses per word
    assert rouge_l([words], [words]) == pytest.approx(100.0, abs=1e-6)


# utils_data/llm_dataset.py, PROMPT_DICT, and utils_data/natural_instruction_loader.py, LLMDataset (use_prompts)
DOLLY_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                    "context. Write a response for the task request.\n\n### Instruction:\nName it.\n\n### Input:"
                    "\nA cat.\n\n### Response:")
DOLLY_NO_INPUT = ("Below is an instruction that describes a task. Write a response for the task request.\n\n"
                  "### Instruction:\nName it.\n\n### Response:")
NI_ALWAYS_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                   "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                   "Name it.\n\n### Input:\n\n\n### Response:")


def test_prompts_are_the_official_strings():
    with_input = Example("Name it.", "A cat.", "Tom", "open_qa", "x")
    no_input = Example("Name it.", "", "Tom", "open_qa", "y")
    assert format_prompt(with_input, "fedkseed-dolly") == DOLLY_WITH_INPUT
    assert format_prompt(no_input, "fedkseed-dolly") == DOLLY_NO_INPUT
    assert format_prompt(no_input, "fedkseed-ni") == NI_ALWAYS_INPUT  # NI always has its input block
    assert format_prompt(Example("Name it.", " ", "Tom", "c", "z"), "fedkseed-dolly").count("### Input:") == 1


def test_official_tokenisation_is_one_text_with_the_prompt_s_length_masked():
    """llm_dataset.preprocess: tokenizer(prompt + output + eos_token), labels[:len(tokenizer(prompt))] = -100."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES)
    ex = Example("Name it.", "", "Tom", "open_qa", "y")
    [item], stats = tokenize_examples([ex], tok, 1024, "fedkseed-dolly")
    whole = tok(DOLLY_NO_INPUT + "Tom" + tok.eos_token)["input_ids"]
    prompt = tok(DOLLY_NO_INPUT)["input_ids"]
    assert list(item.input_ids) == whole and whole[0] == tok.bos_token_id and whole[-1] == tok.eos_token_id
    assert item.prompt_length == len(prompt)
    assert list(item.labels) == [-100] * len(prompt) + whole[len(prompt):]
    [cut], stats = tokenize_examples([ex], tok, len(prompt) + 1, "fedkseed-dolly")  # right truncation keeps the start
    assert list(cut.input_ids) == whole[: len(prompt) + 1] and stats.truncated == 1
    assert tokenize_examples([ex], tok, len(prompt), "fedkseed-dolly")[1].dropped == 1  # nothing left to learn


def test_dolly_holds_out_category_7_summarization():
    """load_data.get_loaders: --zerotask 7 over pd.Categorical codes, i.e. the 8 categories in sorted order."""
    path = shared("data/dolly/databricks-dolly-15k.jsonl")
    examples = load_dolly(path)
    categories = sorted({ex.category for ex in examples})
    assert categories[7] == "summarization"
    train, held = holdout_split(examples, categories[7])
    assert (len(examples), len(train), len(held)) == (15011, 13823, 1188)  # the data set card's counts


def test_dirichlet_balance_is_the_official_cap():
    """partition_data.partition_idx_labeldir: proportions * (len(idx_j) < N / n_parties), labels in order, min 10.

    So a client holds examples of a label only if, before that label was dealt, it
    held fewer than N / n examples.
    """
    rng = np.random.default_rng(0)
    labels = [f"c{i}" for i in rng.choice(7, 4000, p=[0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05])]
    n, clients = len(labels), 60
    order = sorted(set(labels))
    violations = {}
    for balance in (False, True):
        part = partition_dirichlet(labels, clients, 0.5, seed=3, min_size=10, balance=balance)
        assert min(len(c) for c in part.clients) >= 10
        count = 0
        for indices in part.clients:
            held = 0
            for label in order:
                mine = sum(labels[i] == label for i in indices)
                count += mine > 0 and held >= n / clients
                held += mine
        violations[balance] = count
    assert violations[True] == 0 and violations[False] > 0


def _ni(task: str, sizes: dict[str, int], long: int = 0) -> list[Example]:
    return [Example("d", ("x" * 1024 if i < long else f"in{i}"), f"out{i}", task, f"{task}-{i}")
            for i in range(sizes[task])]


def test_natural_instructions_sampling_is_the_official_draw():
    """natural_instruction_loader.get_instruction_dataset, after setup_seed(42)."""
    sizes = {"t0": 100, "t1": 25, "t2": 19, "t3": 3000}
    tasks = _ni("t0", sizes, long=10) + _ni("t1", sizes, long=6) + _ni("t2", sizes) + _ni("t3", sizes)
    train = fedkseed_natural_instructions(tasks, "train", 42)
    # the official code, verbatim in effect: np.random.seed(42); per task, filter, skip < 20, choice 20 %
    np.random.seed(42)
    expected = []
    for task in ("t0", "t1", "t2", "t3"):
        instances = [ex for ex in tasks if ex.category == task and len(ex.input) < 1024]
        if len(instances) < 20:
            continue
        expected += list(np.random.choice(np.array(instances, dtype=object), int(len(instances) * 0.2), replace=False))
    assert [ex.uid for ex in train] == [ex.uid for ex in expected]
    assert {t: sum(ex.category == t for ex in train) for t in sizes} == {"t0": 18, "t1": 0, "t2": 0, "t3": 600}  # t1, t2: 19 left
    test = fedkseed_natural_instructions(tasks, "test", 42)
    # > 20 left: max(20, int(0.02 n)) of them; otherwise all (t1 has 19 after the filter, t2 19)
    assert {t: sum(ex.category == t for ex in test) for t in sizes} == {"t0": 20, "t1": 19, "t2": 19, "t3": 60}


@pytest.mark.parametrize("preset", ["fedkseed-dolly-llama3b.toml", "fedkseed-ni-datajuicer-1.3b.toml",
                                    "ferret-ni-datajuicer-1.3b.toml"])
def test_paper_presets_select_the_official_pipeline(preset):
    table = tomllib.loads((REPO / "configs" / preset).read_text())
    cfg = load_config(REPO / "configs" / preset)
    assert cfg.eval.rouge == "official" and cfg.eval.max_new_tokens == 128
    assert (cfg.robust.norm_clip, cfg.robust.max_weight) == (0.0, 1.0)  # server.aggregate_seed_pool: weighted mean
    assert not cfg.data.path.startswith("../") and "shared" not in cfg.data.path, table["data"]["path"]
    if cfg.data.dataset == "dolly":
        assert (cfg.data.prompt, cfg.data.balance, cfg.data.min_client_examples) == ("fedkseed-dolly", True, 10)
        assert (cfg.data.alpha, cfg.data.holdout, cfg.federation.num_clients) == (0.5, "summarization", 200)
    else:
        assert (cfg.data.prompt, cfg.data.subsample) == ("fedkseed-ni", "fedkseed-ni")
    assert cfg.algorithm["distribution"] == "gaussian"  # mezo_optimizer: torch.normal per parameter
    if cfg.algorithm["name"] == "ferret":  # scripts/ferret.sh and FerretFramework.update (allen4747/Ferret @ 1a412a9)
        alg = cfg.algorithm
        assert (alg["seed_pool"], alg["scale"], alg["clip_norm"], alg["server_lr"]) == (200, "official", 10.0, 10.0)
        assert (alg["lr"], alg["optimizer"], alg["local_steps"] * alg["grad_accum"]) == (1e-4, "sgd", 40)
        assert (cfg.robust.weighting, cfg.federation.rounds, cfg.run.seed) == ("equal", 12, 494)


def test_fedkseed_pro_probabilities_are_the_official_ones():
    """server.py, Server.calculate_probabilities with softmax and min_max_norm (zhenqincn/FedKSeed @ 3cec773):
    every seed's history starts as [grad_initial = 0.0], clients append every step's projected gradient to it
    unweighted, and the probabilities are softmax(min_max_norm(mean |clip(h, +-bias_loss_clip 1000)|))."""
    from fedseed.algorithms.fedkseed import FedKSeed, FedKSeedConfig, SeedReply
    from fedseed.algorithms.robust import RobustSection

    def official(history: list[list[float]], clip: float = 1000.0) -> np.ndarray:
        score = np.array([np.mean(np.abs(np.clip(h, -clip, clip))) for h in history])
        score = (score - np.min(score)) / (np.max(score) + 1e-10 - np.min(score))
        e = np.exp(score - np.max(score))
        p = e / np.sum(e)
        return p / np.sum(p)

    k, steps, rng = 16, 20, np.random.default_rng(0)
    history: list[list[float]] = [[0.0] for _ in range(k)]
    algo = FedKSeed(FedKSeedConfig(num_seeds=k, local_steps=steps, pro=True), seed=1,
                    robust=RobustSection(norm_clip=0, max_weight=1))
    for round in (1, 2, 3):
        probs = algo.task(round, 0, 0).probabilities
        assert np.allclose(probs, official(history), atol=1e-7), round
        replies = []
        for client in range(3):
            ids = rng.choice(k, steps, p=probs.astype(np.float64) / probs.sum())
            g = (rng.standard_cauchy(steps) * 50).astype(np.float32)  # heavy tails: some pass the 1000 clip
            for seed, value in zip(ids, g):
                history[seed].append(float(value))
            replies.append(SeedReply(round, client, 5 + client, steps, 0, 1.0, 0, ids, g))
        for r in replies:
            algo.check(r, algo.task(round, r.client, 0))
        algo.commit(algo.aggregate(round, replies))
    assert max(abs(v) for h in history for v in h) > 1000  # the clip mattered
    assert official(history).max() / official(history).min() == pytest.approx(np.e, rel=1e-6)  # no temperature
