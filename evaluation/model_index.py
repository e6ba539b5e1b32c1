"""The model card's YAML front matter, built with huggingface_hub's own card classes: `model-index` (one
result per evaluated benchmark, with the dataset, split, shots and metric, which the Hub renders as an
evaluation table and leaderboards read), the base model at its pinned revision, license and language
carried from the source, and the tags a quantized release carries."""
from huggingface_hub import EvalResult, ModelCardData

from quantizers import formats

from .task_data import TASKS, WIKITEXT2

METRIC_NAMES = {"acc_norm": "normalized accuracy", "acc": "accuracy", "exact_match": "exact match",
                "mc2": "mc2", "perplexity": "perplexity"}


def _metric(row: dict) -> str:
    return "perplexity" if row["name"] == "perplexity" else row["metric"].split()[0]


def eval_results(report: dict) -> list[EvalResult]:
    """One EvalResult per evaluated benchmark of the quantized model; the fp16 score and the recovery ride
    along in metric_args, the schema's free-form field, so no reader mistakes them for this model's."""
    ev = report.get("evaluation") or {}
    out = []
    for row in ev.get("rows", []):
        if row["name"] == "perplexity":
            if not str(ev.get("text", "")).startswith("wikitext2"):
                continue                       # only the standard text has a dataset to name
            hub, shots, value, fp16 = WIKITEXT2, 0, round(row["quantized"], 3), round(row["fp16"], 3)
        else:
            hub, shots = TASKS[row["name"]].hub, row["shots"]
            value, fp16 = round(100 * row["quantized"], 2), round(100 * row["fp16"], 2)
        metric = _metric(row)
        out.append(EvalResult(task_type="text-generation", task_name="Text Generation", dataset_type=hub.type,
                              dataset_name=hub.title, dataset_config=hub.config, dataset_split=hub.split,
                              dataset_args={"num_few_shot": shots}, metric_type=metric,
                              metric_name=METRIC_NAMES.get(metric, metric), metric_value=value,
                              metric_args={"fp16_value": fp16, "n": row["n"],
                                           "recovery": None if row.get("recovery") is None else round(row["recovery"], 4)}))
    return out


def front_matter(report: dict, name: str) -> str:
    """The YAML block (between --- lines) of the model card; `name`: model-index's name for this model
    (report.card_name: the model's name and the variant, not a folder or job id)."""
    s, src = report["spec"], report.get("source_card") or {}
    hub = "/" in s["model"] and not s["model"].startswith(("/", ".", "~")) and not s["model"].endswith(".gguf")
    library, tags = formats.get(s["format"]).card_tags(s) or (
        "transformers", ["quantized", s["format"], s["algorithm"], f"{s['bits']}-bit", "quantfarm"])
    tags = list(dict.fromkeys(tags))
    extra = {"quantized_by": "quantfarm"}
    merged = report.get("merge")
    if merged:                          # the merge's Hub sources are its base models
        tags += ["merge", "mergekit"]
        hub_sources = [x["model"].split("@")[0] for x in merged["sources"] if x["kind"] == "hub"]
        if hub_sources:
            extra.update(base_model=hub_sources, base_model_relation="merge")
    elif hub:
        extra.update(base_model=s["model"], base_model_relation="quantized", base_model_revision=report.get("revision"))
    results = eval_results(report)
    data = ModelCardData(license=src.get("license"), language=src.get("language"), library_name=library,
                         pipeline_tag="text-generation", tags=tags, model_name=name if results else None,
                         eval_results=results or None, **extra)
    return f"---\n{data.to_yaml()}\n---"
