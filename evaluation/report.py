"""The three report files of an artifact, all from report.json's numbers: report.json itself, README.md
(a model card with the recovery table, as the field's quantized model cards have) and report.html
(the same tables plus matplotlib plots, embedded so the one file opens in any browser)."""
import base64
import html
import io
import json
from pathlib import Path

from quantizers import artifact, formats
from quantizers.scheme import Scheme
from . import model_index, serving
from .escape import md, md_code
from .suite import Evaluation


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def num(x, name="") -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f}" if name == "perplexity" else f"{100 * x:.2f}"


def label(report: dict) -> str:
    s = report["spec"]
    if s["format"] == "gguf":
        return f"GGUF {s['gguf_type']} (llama.cpp, imatrix {s['imatrix']})"
    sym = "" if s["algorithm"] == "awq" else (" sym" if s.get("sym") in (None, True) else " asym")
    return f"{formats.get(s['format']).title} w{s['bits']} g{s['group_size']}{sym} ({s['algorithm']})"


def source_name(report: dict) -> str:
    """The source model's name on the card (the job's source_card: models.source_name), never the server's
    path to it; a report from before it was recorded: the last part of what the job named."""
    known = (report.get("source_card") or {}).get("name")
    return known or shown_ref(report["spec"]["model"].split("@", 1)[0])


def shown_ref(ref: str) -> str:
    """A model reference as a card or release shows it: a path (a server folder or file) by its last part,
    anything else (a Hub id, a demo or merge name) as given."""
    ref = str(ref)
    return (Path(ref.rstrip("/")).name or ref) if ref.startswith(("/", ".", "~")) else ref


def card_name(report: dict) -> str:
    """The model card's model-index name: the model's own name (a Hub repo's, not its owner's) and the variant."""
    return f"{source_name(report).rsplit('/', 1)[-1]} {label(report)}"


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


DEFAULT_SHIP_RECOVERY = 0.95     # the verdict's threshold when the job set no min_recovery


def verdict(report: dict) -> dict:
    """Ship or not: recovery against the job's min_recovery, else against DEFAULT_SHIP_RECOVERY."""
    ev = report.get("evaluation") or {}
    gate = (report.get("spec") or {}).get("min_recovery")
    threshold = gate if gate is not None else DEFAULT_SHIP_RECOVERY
    rec = ev.get("recovery")
    whose = "the job's min_recovery" if gate is not None else "quantfarm's default (the job set no min_recovery)"
    if rec is None:
        return {"ship": None, "text": "no verdict: the evaluation gives no recovery (suite none)", "threshold": threshold}
    ok = rec >= threshold
    return {"ship": ok, "threshold": threshold,
            "text": f"{'ship' if ok else 'do not ship as is'}: recovery {pct(rec)} ({ev.get('recovery_basis')}) is "
                    f"{'at or above' if ok else 'below'} {pct(threshold)}, {whose}"}


def settings_line(report: dict) -> str:
    """The settings used, resolved (not the spec as submitted)."""
    st = report.get("settings") or {}
    if not st:
        return label(report)
    if st["format"] == "gguf":
        return gguf_settings_line(st)
    parts = [f"{st['format']} {st['bits']}-bit, group size {st['group_size']}, {'symmetric' if st['sym'] else 'zero points'}",
             f"algorithm {st['algorithm']}"]
    if st.get("act_order") not in (None, "none"):
        parts.append(f"act-order {st['act_order']}")
    c = st.get("calibration")
    if c:
        parts.append(f"calibration {c['samples']} x {c['seq_len']} tokens of {c['source']} (seed {c['seed']}, "
                     f"hash {c['hash'][:12]})")
    if st.get("keep"):
        parts.append(f"kept in 16 bits: {', '.join(st['keep'])}")
    return "; ".join(parts)


def size_line(report: dict) -> str:
    mb, before, after = 2 ** 20, report.get("size_before_bytes", 0), report.get("size_after_bytes", 0)
    bpw = report.get("bits_per_weight") or {}
    out = f"{before / mb:.1f} MiB at 16 bits -> {after / mb:.1f} MiB ({before / max(after, 1):.2f}x smaller)"
    if bpw:
        gguf = (report.get("settings") or {}).get("format") == "gguf"
        out += (f"; {bpw['quantized_linears']:.2f} bits per weight in the "
                f"{'decoder weight matrices' if gguf else 'quantized Linears (codes, scales, zeros)'}, "
                f"{bpw['overall']:.2f} overall ({'everything in the file' if gguf else 'embeddings, head and norms stay 16-bit'})")
    return out


def runtime_lines(report: dict) -> list[str]:
    return [f"{v['runtime']}: {v['path'] if v['ok'] else 'does not load it'}"
            + (f" ({'; '.join(v['notes'])})" if v.get("notes") else "")
            for v in (report.get("preflight") or {}).get("runtimes", [])]


def usage(report: dict, folder_name: str) -> list[str]:
    """Markdown: how to load this artifact in the runtimes that take it, as code a test runs."""
    st = report.get("settings") or {}
    if st.get("format") == "gguf":
        return gguf_usage(st, folder_name)
    runtimes = {v["runtime"]: v for v in (report.get("preflight") or {}).get("runtimes", [])}
    out = []
    tf = runtimes.get("transformers")
    if tf and tf["ok"]:
        u = formats.get(st["format"]).usage(Scheme(st["bits"], st["group_size"], st["sym"]),
                                            bool(st.get("ragged_groups")))
        out += [f"transformers (with {u.needs} installed):", "",
                "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer" + u.imports,
                f"model_dir = \"{folder_name}\"  # this folder, or its Hub id once published",
                "tokenizer = AutoTokenizer.from_pretrained(model_dir)",
                f"model = AutoModelForCausalLM.from_pretrained(model_dir, device_map=\"auto\"{u.config})",
                "inputs = tokenizer(\"The capital of France is\", return_tensors=\"pt\").to(model.device)",
                "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=16)[0]))", "```", ""]
    elif tf:
        out += [f"transformers does not load it: {'; '.join(tf['notes'])}.", ""]
    vl = runtimes.get("vllm")
    if vl and vl["ok"]:
        out += ["vLLM:", "", "```sh", f"vllm serve {folder_name}", "```", ""]
    elif vl:
        out += [f"vLLM does not load it: {'; '.join(vl['notes'])}.", ""]
    return out


def gguf_settings_line(st: dict) -> str:
    im = {"quantfarm": "quantfarm's, from the calibration forward", "llama": "llama.cpp's llama-imatrix",
          "none": "none"}[st["imatrix"]]
    parts = [f"GGUF {st['gguf_type']} by llama-quantize ({st['llama_cpp']}), importance matrix {im}"]
    c = st.get("calibration")
    if c:
        parts.append(f"calibration {c['samples']} x {c['seq_len']} tokens of {c['source']} (seed {c['seed']}, "
                     f"hash {c['hash'][:12]})")
    if st.get("fallbacks"):
        parts.append("per-tensor fallbacks (widths the type's blocks do not divide): "
                     + ", ".join(f"{k} {n}x" for k, n in st["fallbacks"].items()))
    return "; ".join(parts)


def gguf_usage(st: dict, folder_name: str) -> list[str]:
    first = st["files"][0]
    return ["llama.cpp (and the runtimes built on it: Ollama, LM Studio):", "", "```sh",
            f"llama-completion -m {folder_name}/{first} -p \"The capital of France is\" -n 16 -no-cnv", "```", "",
            *(["transformers (with gguf installed; it dequantizes the weights to 16 bits):", "", "```python",
               "from transformers import AutoModelForCausalLM, AutoTokenizer",
               f"model_dir = \"{folder_name}\"  # this folder, or its Hub id once published",
               "tokenizer = AutoTokenizer.from_pretrained(model_dir)",
               f"model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=\"{first}\")",
               "inputs = tokenizer(\"The capital of France is\", return_tensors=\"pt\")",
               "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=16)[0]))", "```", ""]
              if len(st["files"]) == 1 else [])]


def llama_cpp_rows(part: dict) -> list[list[str]]:
    f, q = part["fp16"], part["quantized"]
    return [["", "perplexity", "KLD mean", "KLD p99", "same top token"],
            ["F16 GGUF", f"{f['perplexity']:.4f}", "", "", ""],
            ["quantized", f"{q['perplexity']:.4f}", f"{q.get('kld', float('nan')):.5f}",
             f"{q.get('kld_p99', float('nan')):.4f}", pct(q.get("same_top_p"))]]


def llama_cpp_lines(part: dict | None) -> list[str]:
    """Markdown: llama.cpp's own perplexity and KLD of the GGUF against its F16 conversion."""
    if not part:
        return []
    return ["", "## llama.cpp perplexity and KL divergence", "",
            f"By llama-perplexity on {part['text']}, {part['chunks']} chunks of {part['ctx']} tokens (it scores the "
            "second half of each chunk); KLD of the quantized file's next-token distributions from the F16 "
            "file's:", "", markdown_table(llama_cpp_rows(part))]


def merge_rows(report: dict) -> list[list[str]]:
    """Header + one row per benchmark: each merge source's fp16 score, the merged model's, the quantized one's;
    what the merge cost and what the quantization cost, side by side."""
    mg, ev = report.get("merge") or {}, report.get("evaluation") or {}
    sources = mg.get("sources") or []
    rows = [["benchmark", *[f"{s['model']} (fp16)" for s in sources], "merged (fp16)", "quantized", "recovery"]]
    for r in ev.get("rows", []):
        rows.append([r["name"], *[num((s.get("scores") or {}).get(r["name"]), r["name"]) for s in sources],
                     num(r["fp16"], r["name"]), num(r["quantized"], r["name"]), pct(r["recovery"])])
    return rows


def merge_lines(report: dict) -> list[str]:
    """Markdown: the merge this model is, its sources at their revisions, their scores, and the recipe."""
    mg = report.get("merge")
    if not mg:
        return []
    import yaml
    out = ["", "## Merge", "", f"The quantized model is a **{mg['method']}** merge, made by mergekit {mg['mergekit']} "
           f"(seed {mg['seed']}, merge key `{mg['key'][:16]}`), of:", ""]
    out += [f"- {md_code(s['model'])} at {md_code(s['revision'])}" + (f" ({md(s['note'])})" if s.get("note") else "")
            for s in mg["sources"]]
    if len(merge_rows(report)) > 1:
        out += ["", "Each source's fp16 score beside the merged model's and the quantized model's (recovery: "
                "quantized against the merged fp16 model):", "", markdown_table([[md(c) for c in r]
                                                                                  for r in merge_rows(report)])]
    return out + ["", "The recipe:", "", "```yaml", yaml.safe_dump(mg["recipe"], sort_keys=False).rstrip(), "```"]


def serving_lines(part: dict | None, folder_name: str) -> list[str]:
    """Markdown: the vLLM inference performance section (nothing when serving was not measured); the serve
    command names this folder as the card's other snippets do (run it beside the folder)."""
    if not part:
        return []
    if "error" in part:
        return ["", "## vLLM inference performance", "", f"Not measured: {part['error']}"]
    st = part["settings"]
    head = "**CPU numbers**, " if part["cpu"] else ""
    command = serving.serve_command(folder_name, st, part.get("dist", "vllm"))
    return ["", "## vLLM inference performance", "",
            f"{head}{part['note']}. vLLM {part['vllm']}, bfloat16 activations, {st['prompt_len']}-token prompts, "
            f"{st['gen_len']} generated tokens, greedy; best of {st['repeats']} runs after a warm-up.", "",
            markdown_table(serving.rows(part)), "",
            *(["![vLLM serving speed, fp16 and quantized](serving.png)", ""] if part.get("speedup") else []),
            "Served with:", "", "```sh", command, "```"]


def model_card(report: dict, folder_name: str = "path/to/this/folder") -> str:
    ev = report["evaluation"]
    name = label(report)
    v = verdict(report)
    facts = [["size", size_line(report)],
             ["loads in", "<br>".join(runtime_lines(report)) or "n/a"], ["settings", settings_line(report)],
             ["source", f"{md_code(source_name(report), table=True)} at revision {md_code(report.get('revision'))}, "
                        f"quantized by quantfarm {report.get('quantfarm', '')}"]]
    lines = [model_index.front_matter(report, card_name(report)), "", f"# {md(source_name(report))}: {name}", "",
             f"**Verdict: {v['text']}.**", "", markdown_table([["", ""], *facts]), "",
             "## Recovery against the fp16 model", "",
             "Scores in % (perplexity as is); recovery = quantized / fp16 (perplexity: fp16 / quantized). "
             "The quantized model was evaluated as loaded back from this folder.", "",
             markdown_table(recovery_rows(ev, name)), ""]
    if ev.get("kld"):
        lines += [f"KL divergence of next-token distributions, fp16 || quantized, on {ev['text']}:", "",
                  markdown_table(kld_rows(ev["kld"])), ""]
    lines += [f"- {n}" for n in notes(ev)]
    lines += llama_cpp_lines(report.get("llama_cpp"))
    lines += merge_lines(report)
    lines += serving_lines(report.get("serving"), folder_name)
    ver = ev["versions"]
    lines += ["", f"Evaluated with lm-eval {ver['lm_eval']}, transformers {ver['transformers']}, torch {ver['torch']}. "
              "All numbers, settings and versions are in `report.json`; plots in `report.html`.", "",
              "## Use", "", *usage(report, folder_name)]
    return "\n".join(lines)


def error_series(layers: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """One line per kind of Linear for the per-layer error plot: experts' Linears averaged over the
    experts of a layer, and kinds quantized as one group (q/k/v, gate/up: the same error) drawn as one
    line named after all of them, so no line hides another."""
    sums: dict[str, dict[int, list[float]]] = {}
    for r in layers:
        for m, v in r["modules"].items():
            if v.get("rel_error") is not None:
                leaf = m.rsplit(".", 1)[-1]
                kind = f"experts.{leaf}" if ".experts." in m else leaf
                sums.setdefault(kind, {}).setdefault(r["index"], []).append(v["rel_error"])
    series = {k: [(i, sum(e) / len(e)) for i, e in sorted(by.items())] for k, by in sorted(sums.items())}
    merged: dict[tuple, list[str]] = {}
    for k, pts in series.items():
        merged.setdefault(tuple(pts), []).append(k)
    return {"/".join(names): list(pts) for pts, names in merged.items()}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def serving_plot(report: dict) -> str | None:
    """Tokens/s of the fp16 model and the artifact in vLLM (base64 PNG), when serving was measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sv = report.get("serving") or {}
    if not sv.get("speedup"):
        return None
    b = str(sv["settings"]["batch"])
    keys = [("prefill_tok_s", "1"), ("prefill_tok_s", b), ("decode_tok_s", "1"), ("decode_tok_s", b)]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = range(len(keys))
    for off, who in ((-0.2, "fp16"), (0.2, "quantized")):
        ax.bar([i + off for i in x], [sv["models"][who][k][n] for k, n in keys], 0.4, label=who)
    ax.set_xticks(list(x), [f"{k.split('_')[0]}, batch {n}" for k, n in keys])
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s")
    ax.legend()
    png = _png(fig)
    plt.close(fig)
    return png


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
        for name, pts in error_series(layers).items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("relative output error")
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)
        out.append(("Per-layer quantization error (relative error of each Linear's output on calibration data)",
                    _png(fig)))
        plt.close(fig)
    png = serving_plot(report)
    if png:
        sv = report["serving"]
        out.append((f"vLLM serving speed ({'CPU' if sv['cpu'] else 'GPU'}: {sv['device']})", png))
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


def html_table(rows: list[list[str]], header: bool = True) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[header:])
    return f"<table{'' if header else ' class=facts'}>{head}{body}</table>"


def html_page(report: dict) -> str:
    ev, name = report["evaluation"], label(report)
    v = verdict(report)
    facts = [["verdict", v["text"]], ["size", size_line(report)], ["loads in", "; ".join(runtime_lines(report)) or "n/a"],
             ["settings", settings_line(report)]]
    cls = "ship" if v["ship"] else "noship" if v["ship"] is False else ""
    parts = [f"<h1>{html.escape(source_name(report))}: {html.escape(name)}</h1>",
             f"<p class='{cls}'><b>Verdict: {html.escape(v['text'])}.</b></p>", html_table(facts, header=False),
             "<h2>Recovery against fp16</h2>", html_table(recovery_rows(ev, name))]
    if ev.get("kld"):
        parts += ["<h2>KL divergence</h2>", html_table(kld_rows(ev["kld"]))]
    parts += ["<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes(ev)) + "</ul>"]
    if report.get("llama_cpp"):
        parts += ["<h2>llama.cpp perplexity and KL divergence</h2>", html_table(llama_cpp_rows(report["llama_cpp"]))]
    if report.get("merge"):
        mg = report["merge"]
        parts += [f"<h2>Merge ({html.escape(mg['method'])}, mergekit {html.escape(mg['mergekit'])})</h2>",
                  html_table(merge_rows(report))]
    sv = report.get("serving")
    if sv and "error" not in sv:
        parts += ["<h2>vLLM inference performance</h2>", f"<p>{html.escape(sv['note'])}.</p>",
                  html_table(serving.rows(sv)), f"<pre>{html.escape(sv['serve_command'])}</pre>"]
    elif sv:
        parts += ["<h2>vLLM inference performance</h2>", f"<p>Not measured: {html.escape(sv['error'])}</p>"]
    for title, png in plots(report):
        parts += [f"<h2>{html.escape(title)}</h2>", f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">']
    parts += ["<h2>Settings used</h2>", f"<pre>{html.escape(json.dumps(report.get('settings') or report['spec'], indent=1))}</pre>"]
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}td:first-child{text-align:left}"
             ".facts td{text-align:left}"
             "img{max-width:100%}.ship{color:#176117}.noship{color:#9b1c1c}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def write(folder, report: dict) -> None:
    """report.json always; README.md and report.html when the report has an evaluation; serving.png (the
    card's speed plot) when serving was measured."""
    artifact.add_file(folder, "report.json", json.dumps(report, indent=2) + "\n")
    png = serving_plot(report)
    if png:
        artifact.add_file(folder, "serving.png", base64.b64decode(png))
    if report.get("evaluation") and report["evaluation"].get("rows"):
        artifact.add_file(folder, "README.md", model_card(report, Path(folder).name))
        artifact.add_file(folder, "report.html", html_page(report))


def read(folder) -> dict:
    p = Path(folder) / "report.json"
    return json.loads(p.read_text()) if p.is_file() else {}
