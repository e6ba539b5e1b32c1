"""The three report files of an artifact, all from report.json's numbers: report.json itself, README.md
(a model card with the recovery table, as the field's quantized model cards have) and report.html
(the same tables plus matplotlib plots, embedded so the one file opens in any browser)."""
import base64
import html
import io
import json
from pathlib import Path

from quantizers import artifact
from .suite import Evaluation


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def num(x, name="") -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f}" if name == "perplexity" else f"{100 * x:.2f}"


def label(report: dict) -> str:
    s = report["spec"]
    sym = "" if s["algorithm"] == "awq" else (" sym" if s.get("sym") in (None, True) else " asym")
    return f"{s['format'].upper() if s['format'] != 'compressed-tensors' else 'compressed-tensors'} " \
           f"w{s['bits']} g{s['group_size']}{sym} ({s['algorithm']})"


def recovery_rows(ev: dict, quantized_name: str = "quantized") -> list[list[str]]:
    """Header + one row per benchmark + the average: the table of the card, the HTML and the CLI."""
    rows = [["benchmark", "shots", "metric", "n", "fp16", quantized_name, "recovery"]]
    for r in ev["rows"]:
        rows.append([r["name"] + (" *" if r.get("substitute") else ""), "" if r["shots"] is None else str(r["shots"]),
                     r["metric"], str(r["n"]), num(r["fp16"], r["name"]), num(r["quantized"], r["name"]),
                     pct(r["recovery"])])
    if ev.get("average"):
        a = ev["average"]
        rows.append(["average (tasks)", "", "", "", num(a["fp16"]), num(a["quantized"]), pct(a["recovery"])])
    return rows


def kld_rows(kld: dict) -> list[list[str]]:
    return [["tokens", "mean", "median", "p99", "max", "top-1 agreement"],
            [str(kld["tokens"]), f"{kld['mean']:.5f}", f"{kld['median']:.5f}", f"{kld['p99']:.4f}",
             f"{kld['max']:.3f}", pct(kld["top1_agreement"])]]


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def markdown_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def notes(ev: dict) -> list[str]:
    out = [f"`*` {r['name']}: {r['substitute']}." for r in ev["rows"] if r.get("substitute")]
    st = ev["settings"]
    lim = st.get("limit")
    if lim:
        text = f" and {Evaluation.model_validate(st).n_windows} text windows" if "perplexity" in ev["parts"] or "kld" in ev["parts"] else ""
        out.append(f"limit {lim}: at most {lim} items per task (for MMLU spread over its subjects in turn){text}; "
                   f"a quick run, not the full benchmark (at n items a score's standard error is up to 50/sqrt(n) points).")
    if ev.get("recovery") is not None:
        out.append(f"Recovery {pct(ev['recovery'])} on the {ev['recovery_basis']}.")
    return out


def model_card(report: dict) -> str:
    ev, s = report["evaluation"], report["spec"]
    name = label(report)
    lines = ["---", f"base_model: {s['model']}", "library_name: transformers",
             f"tags: [quantized, {s['algorithm']}, {s['bits']}-bit, quantfarm]", "---", "",
             f"# {s['model']}: {name}", "",
             f"Quantized by quantfarm {report.get('quantfarm', '')} from `{s['model']}` at revision "
             f"`{report.get('revision')}`. Calibration: {report.get('calibration_hash') and 'hash ' + report['calibration_hash'][:16]} "
             f"({s['calibration']['samples']} x {s['calibration']['seq_len']} tokens, source {s['calibration']['source']}). "
             f"Size {report.get('size_before_bytes', 0) / 2**20:.1f} MiB at 16 bits -> "
             f"{report.get('size_after_bytes', 0) / 2**20:.1f} MiB.", "",
             "## Recovery against the fp16 model", "",
             "Scores in % (perplexity as is); recovery = quantized / fp16 (perplexity: fp16 / quantized). "
             "The quantized model was evaluated as loaded back from this folder.", "",
             markdown_table(recovery_rows(ev, name)), ""]
    if ev.get("kld"):
        lines += [f"KL divergence of next-token distributions, fp16 || quantized, on {ev['text']}:", "",
                  markdown_table(kld_rows(ev["kld"])), ""]
    lines += [f"- {n}" for n in notes(ev)]
    v = ev["versions"]
    lines += ["", f"Evaluated with lm-eval {v['lm_eval']}, transformers {v['transformers']}, torch {v['torch']}. "
              "All numbers, settings and versions are in `report.json`; plots in `report.html`.", "",
              "## Use", "", "```python", "from transformers import AutoModelForCausalLM",
              "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")", "```", "",
              "```sh", "vllm serve path/to/this/folder", "```", ""]
    return "\n".join(lines)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def plots(report: dict) -> list[tuple[str, str]]:
    """(title, base64 PNG) for the task bars, per-layer quantization error and the KLD histogram."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev, out = report["evaluation"], []
    tasks = [r for r in ev["rows"] if r["name"] != "perplexity"]
    if tasks:
        fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(tasks)), 3.2))
        x = range(len(tasks))
        ax.bar([i - 0.2 for i in x], [100 * r["fp16"] for r in tasks], 0.4, label="fp16")
        ax.bar([i + 0.2 for i in x], [100 * r["quantized"] for r in tasks], 0.4, label="quantized")
        ax.set_xticks(list(x), [r["name"] for r in tasks], rotation=20)
        ax.set_ylabel("score (%)")
        ax.legend()
        out.append(("Per-task score, fp16 vs quantized", _png(fig)))
        plt.close(fig)
    layers = report.get("layers") or []
    if layers and layers[0].get("modules"):
        fig, ax = plt.subplots(figsize=(7, 3.2))
        kinds = sorted({m.rsplit(".", 1)[-1] for r in layers for m in r["modules"]})
        for kind in kinds:
            pts = [(r["index"], v["rel_error"]) for r in layers for m, v in r["modules"].items()
                   if m.rsplit(".", 1)[-1] == kind and v.get("rel_error") is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=kind)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("relative output error")
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)
        out.append(("Per-layer quantization error (relative error of each Linear's output on calibration data)",
                    _png(fig)))
        plt.close(fig)
    if ev.get("kld"):
        h = ev["kld"]["histogram"]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        edges = h["edges"]
        ax.bar(edges[:-1], h["counts"], width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge")
        ax.set_xscale("log")
        ax.set_xlabel("per-token KL(fp16 || quantized), nats (clipped to the axis)")
        ax.set_ylabel("tokens")
        out.append(("Per-token KL divergence", _png(fig)))
        plt.close(fig)
    return out


def html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def html_page(report: dict) -> str:
    ev, name = report["evaluation"], label(report)
    parts = [f"<h1>{html.escape(report['spec']['model'])}: {html.escape(name)}</h1>",
             "<h2>Recovery against fp16</h2>", html_table(recovery_rows(ev, name))]
    if ev.get("kld"):
        parts += ["<h2>KL divergence</h2>", html_table(kld_rows(ev["kld"]))]
    parts += ["<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes(ev)) + "</ul>"]
    for title, png in plots(report):
        parts += [f"<h2>{html.escape(title)}</h2>", f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">']
    parts += ["<h2>Settings</h2>", f"<pre>{html.escape(json.dumps(report['spec'], indent=1))}</pre>"]
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def write(folder, report: dict) -> None:
    """report.json always; README.md and report.html when the report has an evaluation."""
    artifact.add_file(folder, "report.json", json.dumps(report, indent=2) + "\n")
    if report.get("evaluation") and report["evaluation"].get("rows"):
        artifact.add_file(folder, "README.md", model_card(report))
        artifact.add_file(folder, "report.html", html_page(report))


def read(folder) -> dict:
    p = Path(folder) / "report.json"
    return json.loads(p.read_text()) if p.is_file() else {}
