"""The six Open LLM Leaderboard v1 tasks through lm-eval, on local data.

lm-eval's own task configs are used (prompts, few-shot rules, filters, metrics), each with its original
shot count; only the dataset is swapped for the rows of `task_data`, so a result here is what lm-eval
gives on those rows. MMLU runs as lm-eval's 57 subject tasks, combined as its group does (weighted by
size). `limit` caps the items of each task; for MMLU, the whole task's items, spread over the subjects
in turn (limit 100: two from each of the first 43 subjects, one from the other 14) rather than
lm-eval's per-subject --limit, so that a quick run is quick for every task alike.
"""
import functools
import logging
import pathlib
import time
from importlib.metadata import version

from core.errors import EvaluationError

from .task_data import TASKS, splits

FEWSHOT_SEED = 1234          # lm-eval's default fewshot_random_seed
TASK_FOLDERS = ("arc", "hellaswag", "mmlu/default", "truthfulqa", "winogrande", "gsm8k")


def lm_eval_version() -> str:
    return version("lm_eval")


@functools.cache
def _task_manager():
    import lm_eval
    from lm_eval.tasks import TaskManager
    root = pathlib.Path(lm_eval.__file__).parent / "tasks"
    return TaskManager(include_defaults=False, include_path=[str(root / d) for d in TASK_FOLDERS])


def _local_config(tm, task: str, rows: dict[str, list[dict]], num_fewshot: int) -> dict:
    """lm-eval's config for `task` with its dataset replaced by `rows` ({split: rows})."""
    import datasets
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = tm.task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise EvaluationError(f"lm-eval {lm_eval_version()} has no task {task!r}")
    cfg = dict(load_yaml(entry.yaml_path, resolve_func=True))
    for key in ("tag", "group", "dataset_path", "dataset_name", "dataset_kwargs"):
        cfg.pop(key, None)
    data = {k: datasets.Dataset.from_list(v) for k, v in rows.items()}
    cfg["custom_dataset"] = lambda **_: data
    cfg["num_fewshot"] = num_fewshot
    for split in ("training_split", "validation_split", "test_split"):
        if cfg.get(split) not in rows:
            cfg[split] = None
    if task == "hellaswag":                       # rows are already in process_docs' output form
        cfg["process_docs"] = None
        cfg["fewshot_split"] = "validation"       # no train split here: shots from validation, item left out
    return cfg


def spread(limit: int | None, n_subjects: int) -> list[int | None]:
    """Items per subject when `limit` MMLU items are taken from the subjects in turn."""
    if limit is None:
        return [None] * n_subjects
    return [limit // n_subjects + (k < limit % n_subjects) for k in range(n_subjects)]


def build_tasks(names, folder: pathlib.Path, mmlu_limit: int | None = None) -> dict:
    """{lm-eval task name: ConfigurableTask} for our task names (mmlu expands to its subjects, each cut to
    its share of `mmlu_limit`; subjects with no share are left out)."""
    from lm_eval.api.task import ConfigurableTask

    tm = _task_manager()
    tasks = {}
    for name in names:
        t = TASKS[name]
        if name == "mmlu":
            subjects = splits(name, folder)
            for (subject, rows), n in zip(subjects.items(), spread(mmlu_limit, len(subjects))):
                if n != 0:
                    rows = {**rows, "test": rows["test"][:n]}
                    tasks[f"mmlu_{subject}"] = _local_config(tm, f"mmlu_{subject}", rows, t.num_fewshot)
        else:
            tasks[t.lm_eval_task] = _local_config(tm, t.lm_eval_task, splits(name, folder), t.num_fewshot)
    for cfg in tasks.values():
        cfg["_task"] = ConfigurableTask(config={k: v for k, v in cfg.items() if k != "_task"})
        cfg["_task"].set_fewshot_seed(FEWSHOT_SEED)
    return {k: cfg["_task"] for k, cfg in tasks.items()}


def lm_for(model, tokenizer, batch_size: int = 8, max_length: int | None = None, share_prefix: bool = True):
    """lm-eval's Hugging Face adapter around an already loaded model (fp16 or loaded from an artifact);
    by default the variant that runs each shared context once (prefix_lm)."""
    from lm_eval.models.huggingface import HFLM

    from .prefix_lm import PrefixSharingLM
    cls = PrefixSharingLM if share_prefix else HFLM
    return cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def run(lm, names, folder: pathlib.Path, limit: int | None = None) -> dict:
    """{task: {"score", "metric", "n", "shots"}} for each of our task names, scored by lm-eval."""
    from lm_eval import evaluator

    logging.getLogger("lm_eval").setLevel(logging.ERROR)     # its notes on custom datasets are expected here
    scores = {}
    for name in names:
        t, started = TASKS[name], time.perf_counter()
        tasks = build_tasks([name], folder, mmlu_limit=limit)
        out = evaluator.evaluate(lm=lm, task_dict=tasks, limit=None if name == "mmlu" else limit, bootstrap_iters=0,
                                 log_samples=False, verbosity="WARNING")
        res, n = out["results"], out["n-samples"]
        members = list(tasks)
        sizes = [n[m]["effective"] for m in members]
        vals = [res[m][t.metric] for m in members]
        score = sum(v * s for v, s in zip(vals, sizes)) / sum(sizes)
        scores[name] = {"score": float(score), "metric": t.metric.split(",")[0] + (
            "" if t.metric.endswith(",none") else f" ({t.metric.split(',')[1]})"), "n": sum(sizes),
            "shots": t.num_fewshot, "seconds": time.perf_counter() - started,
            **({"substitute": t.substitute} if t.substitute else {})}
    return scores
