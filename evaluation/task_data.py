"""The six Open LLM Leaderboard v1 tasks' data, read from the shared data folder into the row schema of
the Hugging Face datasets that lm-eval's task configs expect, so those configs (prompts, few-shot
rules, metrics) apply unchanged. Nothing is fetched.

Substitutes (the shared data README explains why): HellaSwag comes as llama.cpp's text layout, already
preprocessed, and has no train split, so its 10 shots are drawn from validation with the scored item
left out; Winogrande's 5 shots come from train_l, a nested subset of train_xl.
"""
import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from calibration.sources import data_dir
from core.errors import EvaluationError


@dataclass(frozen=True)
class HubDataset:
    """The Hugging Face dataset a task's local files are a copy of, as a model card's model-index names it."""
    title: str                   # the Open LLM Leaderboard's name for the task
    type: str
    config: str | None
    split: str


@dataclass(frozen=True)
class LocalTask:
    """One leaderboard task: its lm-eval config name, shots, headline metric and where its rows live."""
    name: str
    lm_eval_task: str            # a task in lm-eval's registry (for mmlu: the prefix of its 57 subtasks)
    num_fewshot: int
    metric: str                  # lm-eval metric key, filter included
    files: tuple[str, ...]       # relative to the data folder (globs allowed)
    hub: HubDataset
    substitute: str = ""


TASKS = {
    "arc_challenge": LocalTask("arc_challenge", "arc_challenge", 25, "acc_norm,none",
                               ("arc_challenge/ARC-Challenge-Test.jsonl", "arc_challenge/ARC-Challenge-Train.jsonl"),
                               HubDataset("AI2 Reasoning Challenge (25-Shot)", "ai2_arc", "ARC-Challenge", "test")),
    "hellaswag": LocalTask("hellaswag", "hellaswag", 10, "acc_norm,none", ("hellaswag/hellaswag_val_full.txt",),
                           HubDataset("HellaSwag (10-Shot)", "hellaswag", None, "validation"),
                           "llama.cpp text layout (ctx_b not capitalized); shots from validation, item excluded"),
    "mmlu": LocalTask("mmlu", "mmlu", 5, "acc,none", ("mmlu/test/*.csv", "mmlu/dev/*.csv"),
                      HubDataset("MMLU (5-Shot)", "cais/mmlu", "all", "test")),
    "truthfulqa_mc2": LocalTask("truthfulqa_mc2", "truthfulqa_mc2", 0, "acc,none", ("truthfulqa/mc_task.json",),
                                HubDataset("TruthfulQA (0-shot)", "truthful_qa", "multiple_choice", "validation")),
    "winogrande": LocalTask("winogrande", "winogrande", 5, "acc,none",
                            ("winogrande/dev.jsonl", "winogrande/dev-labels.lst", "winogrande/train_l.jsonl",
                             "winogrande/train_l-labels.lst"),
                            HubDataset("Winogrande (5-shot)", "winogrande", "winogrande_xl", "validation"),
                            "shots from train_l (a subset of train_xl)"),
    "gsm8k": LocalTask("gsm8k", "gsm8k", 5, "exact_match,strict-match", ("gsm8k/test.jsonl", "gsm8k/train.jsonl"),
                       HubDataset("GSM8k (5-shot)", "gsm8k", "main", "test")),
}
# The perplexity and KLD text: WikiText-2's validation split in its tokenized release (wikitext-2-v1).
WIKITEXT2 = HubDataset("WikiText-2 (validation)", "wikitext", "wikitext-2-v1", "validation")


def task_folder(folder: Path | None = None) -> Path:
    folder = Path(folder) if folder else data_dir()
    if folder is None or not folder.is_dir():
        raise EvaluationError("the leaderboard tasks need the shared data folder: set QUANTFARM_DATA (or "
                              "evaluation.data_dir) to the folder holding arc_challenge/, mmlu/, ...")
    return folder


def task_files(task: LocalTask, folder: Path) -> list[Path]:
    paths = []
    for pattern in task.files:
        found = sorted(folder.glob(pattern))
        if not found:
            raise EvaluationError(f"{task.name}: {folder / pattern} is missing from the data folder")
        paths += found
    return paths


def data_hash(names, folder: Path) -> str:
    """sha256 over the names and bytes of every file the tasks read: part of the baseline cache key."""
    h = hashlib.sha256()
    for name in sorted(names):
        for p in task_files(TASKS[name], folder):
            h.update(str(p.relative_to(folder)).encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def arc_rows(path: Path) -> list[dict]:
    """AI2's ARC JSONL -> ai2_arc rows (choices as parallel text/label lists)."""
    return [{"id": r["id"], "question": r["question"]["stem"],
             "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                         "label": [c["label"] for c in r["question"]["choices"]]},
             "answerKey": r["answerKey"]} for r in _jsonl(path)]


def hellaswag_rows(path: Path) -> list[dict]:
    """llama.cpp's 6-line HellaSwag items -> the rows lm-eval's process_docs would produce."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise EvaluationError(f"{path}: expected 6 lines per item, got {len(lines)} lines")
    return [{"query": lines[i], "choices": lines[i + 2:i + 6], "label": int(lines[i + 1])}
            for i in range(0, len(lines), 6)]


def mmlu_rows(path: Path) -> list[dict]:
    """A Hendrycks MMLU CSV (no header; question, A, B, C, D, answer letter) -> cais/mmlu rows. The files
    mix CRLF and LF line ends; quoted fields are normalised to LF, as in the HF copy."""
    subject = path.stem.rsplit("_", 1)[0]
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    fix = lambda s: s.replace("\r\n", "\n")  # noqa: E731
    return [{"question": fix(r[0]), "subject": subject, "choices": [fix(c) for c in r[1:5]],
             "answer": "ABCD".index(r[5].strip())} for r in rows if r]


def truthfulqa_rows(path: Path) -> list[dict]:
    """The v0 mc_task.json ({choice: label} maps) -> truthful_qa multiple_choice rows (lists, file order)."""
    def targets(m):
        return {"choices": list(m), "labels": [int(v) for v in m.values()]}
    return [{"question": r["question"], "mc1_targets": targets(r["mc1_targets"]),
             "mc2_targets": targets(r["mc2_targets"])} for r in json.loads(path.read_text(encoding="utf-8"))]


def winogrande_rows(path: Path, labels: Path) -> list[dict]:
    rows, answers = _jsonl(path), labels.read_text().split()
    if len(rows) != len(answers):
        raise EvaluationError(f"{path}: {len(rows)} items but {len(answers)} labels in {labels}")
    return [{"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": a}
            for r, a in zip(rows, answers)]


def gsm8k_rows(path: Path) -> list[dict]:
    return [{"question": r["question"], "answer": r["answer"]} for r in _jsonl(path)]


def splits(name: str, folder: Path) -> dict[str, list[dict]]:
    """{split: rows} for one task, with the split names its lm-eval config uses. MMLU gives
    {subject: {"test": ..., "dev": ...}} instead, one entry per subtask. A file not in its task's layout is
    named with what kind of fault it has, never with what it holds: the message of int('...') or a
    KeyError quotes the data, and a farm job's error is read by whoever submitted it."""
    try:
        return _splits(name, folder)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:   # JSONDecodeError, UnicodeDecodeError
        raise EvaluationError(f"{name}: the task data under {folder} is not in the layout of its files "
                              f"({', '.join(TASKS[name].files)}): {type(e).__name__} while reading it; restore the "
                              "files from the shared data folder") from None


def _splits(name: str, folder: Path) -> dict[str, list[dict]]:
    d = folder
    if name == "arc_challenge":
        return {"test": arc_rows(d / TASKS[name].files[0]), "train": arc_rows(d / TASKS[name].files[1])}
    if name == "hellaswag":
        return {"validation": hellaswag_rows(d / TASKS[name].files[0])}
    if name == "truthfulqa_mc2":
        return {"validation": truthfulqa_rows(d / TASKS[name].files[0])}
    if name == "winogrande":
        w = "winogrande/"
        return {"validation": winogrande_rows(d / (w + "dev.jsonl"), d / (w + "dev-labels.lst")),
                "train": winogrande_rows(d / (w + "train_l.jsonl"), d / (w + "train_l-labels.lst"))}
    if name == "gsm8k":
        return {"test": gsm8k_rows(d / "gsm8k/test.jsonl"), "train": gsm8k_rows(d / "gsm8k/train.jsonl")}
    if name == "mmlu":
        test = sorted((d / "mmlu/test").glob("*_test.csv"))
        if not test:
            raise EvaluationError(f"no MMLU test CSVs under {d / 'mmlu/test'}")
        out = {}
        for p in test:
            subject = p.stem.rsplit("_", 1)[0]
            out[subject] = {"test": mmlu_rows(p), "dev": mmlu_rows(d / "mmlu/dev" / f"{subject}_dev.csv")}
        return out
    raise EvaluationError(f"unknown task {name!r}; the leaderboard tasks are {', '.join(TASKS)}")
