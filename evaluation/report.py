"""The three report files of an artifact, all from report.json's numbers: report.json itself, README.md
(a model card with the recovery table, as the field's quantized model cards have) and report.html
(the same tables plus matplotlib plots, embedded so the one file opens in any browser)."""
import base64
import html
import json
from pathlib import Path

from quantizers import artifact, formats
from quantizers.algorithms import ALGORITHMS
from quantizers.scheme import Scheme
from quantizers.schemes import SCHEMES

from . import model_index, plots, serving
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
    fmt = formats.get(s["format"])
    own = fmt.spec_line(s)
    if own:
        return own
    alg = ALGORITHMS.get(s["algorithm"])
    sym = s.get("sym")
    if sym is None and alg is not None:
        sym = alg.SYM_DEFAULT
    sym = "" if alg is not None and alg.SYM_FIXED else (" sym" if sym in (None, True) else " asym")
    if s.get("scheme"):
        return f"{fmt.title} {s['scheme']} ({s['algorithm']})"
    return f"{fmt.title} w{s['bits']} g{s['group_size']}{sym} ({s['algorithm']})"


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
    own = formats.get(st["format"]).card_line(st)
    if own:
        return own
    parts = [f"{st['format']} {SCHEMES[st['scheme']].words()}" if st.get("scheme") else
             f"{st['format']} {st['bits']}-bit, group size {st['group_size']}, {'symmetric' if st['sym'] else 'zero points'}",
             f"algorithm {st['algorithm']}"]
    if st.get("act_order") not in (None, "none"):
        parts.append(f"act-order {st['act_order']}")
    if st.get("scheme"):
        parts.append(f"made for {SCHEMES[st['scheme']].hardware}")
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
        fmt = formats.FORMATS.get((report.get("settings") or {}).get("format"))
        part, overall = (fmt or formats.get("gptq")).size_words()
        out += (f"; {bpw['quantized_linears']:.2f} bits per weight in the {part}, "
                f"{bpw['overall']:.2f} overall ({overall})")
    return out


def runtime_lines(report: dict) -> list[str]:
    return [f"{v['runtime']}: {v['path'] if v['ok'] else 'does not load it'}"
            + (f" ({'; '.join(v['notes'])})" if v.get("notes") else "")
            for v in (report.get("preflight") or {}).get("runtimes", [])]


def usage(report: dict, folder_name: str) -> list[str]:
    """Markdown: how to load this artifact in the runtimes that take it, as code a test runs."""
    st = report.get("settings") or {}
    own = formats.get(st["format"]).card_usage(st, folder_name) if st.get("format") else None
    if own is not None:
        return own
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
    for title, png in plots.plots(report):
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
    png = plots.serving_plot(report)
    if png:
        artifact.add_file(folder, "serving.png", base64.b64decode(png))
    if report.get("evaluation") and report["evaluation"].get("rows"):
        artifact.add_file(folder, "README.md", model_card(report, Path(folder).name))
        artifact.add_file(folder, "report.html", html_page(report))


def read(folder) -> dict:
    p = Path(folder) / "report.json"
    return json.loads(p.read_text()) if p.is_file() else {}
