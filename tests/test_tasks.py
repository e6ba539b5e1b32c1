"""Each leaderboard task's prompts and scoring, against expectations computed here from the raw data files.

A stand-in LM whose log-likelihoods follow a fixed rule (minus the continuation's length, or a bonus for
one answer) records every request lm-eval makes: the prompts are checked piece by piece (few-shot
count and layout, the item last, the scored continuations) and each metric against its hand-computed
value, so a wrong few-shot format, split, answer mapping or metric fails here.
"""
import csv
import json
import math

import pytest

pytest.importorskip("lm_eval")
from lm_eval.api.model import LM  # noqa: E402

from evaluation import leaderboard  # noqa: E402
from evaluation.task_data import data_hash, hellaswag_rows  # noqa: E402
from tests.conftest import require_shared_data  # noqa: E402


class RuleLM(LM):
    """loglikelihood(ctx, cont) = rule(ctx, cont); generate_until answers from `answers`."""

    def __init__(self, rule=lambda ctx, cont: -float(len(cont)), answers=None):
        super().__init__()
        self.rule, self.answers, self.ll_requests, self.gen_requests = rule, answers or {}, [], []

    def loglikelihood(self, requests, disable_tqdm=False):
        self.ll_requests += [r.args for r in requests]
        return [(self.rule(ctx, cont), False) for ctx, cont in (r.args for r in requests)]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError("not used by the leaderboard tasks")

    def generate_until(self, requests, disable_tqdm=False):
        self.gen_requests += [r.args for r in requests]
        return [self.answers.get(ctx.rsplit("Question: ", 1)[-1], "no idea") for ctx, _ in (r.args for r in requests)]


@pytest.fixture(scope="module")
def data():
    return require_shared_data("arc_challenge/ARC-Challenge-Test.jsonl").parent.parent


def jsonl(path, n=None):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n] if n else rows


def by_item(requests):
    """Consecutive requests sharing a context prefix item: {context's last block: [(ctx, cont)]}."""
    items = {}
    for ctx, cont in requests:
        items.setdefault(ctx, []).append((ctx, cont))
    return list(items.values())


def test_arc_challenge_25_shot_acc_norm(data):
    n = 6
    lm = RuleLM()
    got = leaderboard.run(lm, ["arc_challenge"], data, limit=n)["arc_challenge"]
    test = jsonl(data / "arc_challenge/ARC-Challenge-Test.jsonl", n)
    train = {r["question"]["stem"]: r for r in jsonl(data / "arc_challenge/ARC-Challenge-Train.jsonl")}
    groups = by_item(lm.ll_requests)
    assert len(groups) == n
    hits = 0
    for item, reqs in zip(test, groups):
        choices = [c["text"] for c in item["question"]["choices"]]
        ctx = reqs[0][0]
        blocks = ctx.split("\n\n")
        assert len(blocks) == 26 and blocks[-1] == f"Question: {item['question']['stem']}\nAnswer:"
        for shot in blocks[:-1]:          # each shot: a train question with its correct answer's text
            q, a = shot.removeprefix("Question: ").split("\nAnswer: ")
            src = train[q]
            gold = next(c["text"] for c in src["question"]["choices"] if c["label"] == src["answerKey"])
            assert a == gold
        assert [c for _, c in reqs] == [" " + c for c in choices]
        # ll = -len(" " + choice): acc_norm divides by len(choice), so the longest choice wins (first on ties)
        longest = max(range(len(choices)), key=lambda i: (len(choices[i]), -i))
        hits += [c["label"] for c in item["question"]["choices"]].index(item["answerKey"]) == longest
    assert got["metric"] == "acc_norm" and got["shots"] == 25 and got["n"] == n
    assert got["score"] == pytest.approx(hits / n)


def test_hellaswag_10_shot_from_validation_without_the_item(data):
    n = 5
    lm = RuleLM()
    got = leaderboard.run(lm, ["hellaswag"], data, limit=n)["hellaswag"]
    rows = hellaswag_rows(data / "hellaswag/hellaswag_val_full.txt")
    raw = (data / "hellaswag/hellaswag_val_full.txt").read_text().split("\n")
    assert rows[0] == {"query": raw[0], "label": int(raw[1]), "choices": raw[2:6]}
    solved = {r["query"] + " " + r["choices"][r["label"]] for r in rows}
    hits = 0
    for item, reqs in zip(rows[:n], by_item(lm.ll_requests)):
        blocks = reqs[0][0].split("\n\n")
        assert len(blocks) == 11 and blocks[-1] == item["query"]
        assert all(b in solved for b in blocks[:-1])
        assert not any(b.startswith(item["query"] + " ") for b in blocks[:-1])
        assert [c for _, c in reqs] == [" " + c for c in item["choices"]]
        hits += item["label"] == max(range(4), key=lambda i: (len(item["choices"][i]), -i))
    assert got["score"] == pytest.approx(hits / n) and got["shots"] == 10


def test_mmlu_5_shot_prompt_and_limit_spread_over_subjects(data):
    lm = RuleLM(rule=lambda ctx, cont: 0.0 if cont == " B" else -1.0)
    got = leaderboard.run(lm, ["mmlu"], data, limit=60)["mmlu"]
    assert got["n"] == 60 and got["metric"] == "acc" and got["shots"] == 5
    subjects = sorted(p.name.removesuffix("_test.csv") for p in (data / "mmlu/test").glob("*_test.csv"))
    assert len(subjects) == 57

    def rows(split, subject):
        with open(data / f"mmlu/{split}/{subject}_{split}.csv", newline="") as f:
            return [[c.replace("\r\n", "\n") for c in r] for r in csv.reader(f)]

    def block(r, answer=True):
        q = f"{r[0].strip()}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\nAnswer:"
        return q + (f" {r[5]}" if answer else "")

    dev, test = rows("dev", "abstract_algebra"), rows("test", "abstract_algebra")
    expected = ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                + "\n\n".join(block(r) for r in dev) + "\n\n" + block(test[0], answer=False))
    contexts = list(dict.fromkeys(ctx for ctx, _ in lm.ll_requests))
    assert contexts[0] == expected
    assert [c for ctx, c in lm.ll_requests if ctx == expected] == [" A", " B", " C", " D"]
    # 60 items over 57 subjects in turn: two from each of the first three, one from every other
    taken = {s: (2 if i < 3 else 1) for i, s in enumerate(subjects)}
    answers = [r[5] for s, k in taken.items() for r in rows("test", s)[:k]]
    assert got["score"] == pytest.approx(sum(a == "B" for a in answers) / 60)


def test_truthfulqa_mc2_zero_shot_probability_mass(data):
    n = 4
    lm = RuleLM()
    got = leaderboard.run(lm, ["truthfulqa_mc2"], data, limit=n)["truthfulqa_mc2"]
    items = json.loads((data / "truthfulqa/mc_task.json").read_text())[:n]
    groups = by_item(lm.ll_requests)
    expected = []
    for item, reqs in zip(items, groups):
        ctx = reqs[0][0]
        assert ctx.startswith("Q: What is human life expectancy in the United States?\nA: Human life expectancy")
        assert ctx.count("\n\nQ: ") == 6 and ctx.endswith(f"\n\nQ: {item['question']}\nA:")
        choices = list(item["mc2_targets"])
        assert [c for _, c in reqs] == [" " + c for c in choices]
        p = [math.exp(-len(" " + c)) for c in choices]
        expected.append(sum(pi for pi, c in zip(p, choices) if item["mc2_targets"][c]) / sum(p))
    assert got["metric"] == "acc" and got["shots"] == 0
    assert got["score"] == pytest.approx(sum(expected) / n)


def test_winogrande_5_shot_partial_scoring(data):
    n = 6
    option = {}

    def rule(ctx, cont):            # favour option1 when the answer file says 2, and vice versa
        return 0.0 if ctx.endswith(option[cont][1]) else -1.0

    rows = jsonl(data / "winogrande/dev.jsonl", n)
    labels = (data / "winogrande/dev-labels.lst").read_text().split()[:n]
    for r, lab in zip(rows, labels):
        i = r["sentence"].index("_")
        option[" " + r["sentence"][i + 1:].strip()] = (r, r["option2"] if lab == "1" else r["option1"])
    lm = RuleLM(rule=rule)
    got = leaderboard.run(lm, ["winogrande"], data, limit=n)["winogrande"]
    train_labels = (data / "winogrande/train_l-labels.lst").read_text().split()
    filled = set()                    # each train sentence with its blank filled by the right option
    for t, lab in zip(jsonl(data / "winogrande/train_l.jsonl"), train_labels):
        i = t["sentence"].index("_")
        filled.add(t["sentence"][:i] + t["option" + lab] + " " + t["sentence"][i + 1:].strip())
    for r, k in zip(rows, range(0, 2 * n, 2)):
        (c1, s1), (c2, s2) = lm.ll_requests[k], lm.ll_requests[k + 1]
        i = r["sentence"].index("_")
        assert c1.endswith(r["sentence"][:i] + r["option1"]) and c2.endswith(r["sentence"][:i] + r["option2"])
        assert s1 == s2 == " " + r["sentence"][i + 1:].strip()
        shots = c1.split("\n\n")[:-1]
        assert len(shots) == 5
        assert all(shot in filled for shot in shots)
    assert got["score"] == 0.0        # the rule always prefers the wrong option
    assert got["shots"] == 5 and got["n"] == n


def test_gsm8k_5_shot_strict_exact_match(data):
    n = 5
    test = jsonl(data / "gsm8k/test.jsonl", n)
    train = {r["question"]: r["answer"] for r in jsonl(data / "gsm8k/train.jsonl")}
    gold = [t["answer"].split("#### ")[-1] for t in test]
    # right for items 0, 2, 3 (item 3 with a thousands comma the metric ignores); a bare number for item 1
    answers = {f"{test[0]['question']}\nAnswer:": f" So #### {gold[0]}",
               f"{test[1]['question']}\nAnswer:": f" The answer is {gold[1]}.",
               f"{test[2]['question']}\nAnswer:": f" #### {gold[2]}\n",
               f"{test[3]['question']}\nAnswer:": f" #### {int(gold[3]):,}"}
    lm = RuleLM(answers=answers)
    got = leaderboard.run(lm, ["gsm8k"], data, limit=n)["gsm8k"]
    assert len(lm.gen_requests) == n
    for t, (ctx, kwargs) in zip(test, lm.gen_requests):
        blocks = ctx.split("\n\n")
        assert blocks[-1] == f"Question: {t['question']}\nAnswer:"
        shots = ctx.rsplit("\n\nQuestion: ", 1)[0].split("\n\nQuestion: ")
        assert len(shots) == 5
        for shot in shots:
            q, a = shot.removeprefix("Question: ").split("\nAnswer: ", 1)
            assert train[q] == a
        assert "Question:" in kwargs["until"] and kwargs.get("do_sample") is False
    assert got["metric"] == "exact_match (strict-match)"
    assert got["score"] == pytest.approx(3 / n)


def test_data_hash_names_every_file(data, tmp_path):
    import shutil
    h = data_hash(["winogrande"], data)
    copy = tmp_path / "data"
    shutil.copytree(data / "winogrande", copy / "winogrande")
    assert data_hash(["winogrande"], copy) == h
    with open(copy / "winogrande/dev-labels.lst", "a") as f:
        f.write("1\n")
    assert data_hash(["winogrande"], copy) != h
