"""A release's summary: one table of all its variants (size, bits per weight, perplexity, KLD, task
recovery, which runtimes load it), written as release.json, a model-card index README.md and an HTML
page with a size-against-recovery plot, so a user picks the variant to ship from one place."""
import html
import json
from pathlib import Path

from core.paths import write_atomic
from quantizers.schemes import SCHEMES

from . import plots, report
from .escape import md, md_code, no_html


def row(name: str, state: str, rep: dict | None, *, error: str | None = None, note: str | None = None,
        job_id: str | None = None) -> dict:
    """One variant's line from its report.json (None when it produced none)."""
    out = {"variant": name, "state": state, "job_id": job_id, "error": error, "note": note}
    if not rep:
        return out
    st, ev = rep.get("settings") or {}, rep.get("evaluation") or {}
    ppl = next((r for r in ev.get("rows", []) if r["name"] == "perplexity"), None)
    avg = ev.get("average") or {}
    out.update(
        artifact=rep.get("artifact"), format=st.get("format"), scheme=st.get("scheme"), algorithm=st.get("algorithm"),
        bits=st.get("bits"),
        group_size=st.get("group_size"), sym=st.get("sym"), act_order=st.get("act_order"),
        size_bytes=rep.get("size_after_bytes"), size_fp16_bytes=rep.get("size_before_bytes"),
        bits_per_weight=(rep.get("bits_per_weight") or {}).get("overall"),
        perplexity=ppl and {"fp16": ppl["fp16"], "quantized": ppl["quantized"]},
        kld_mean=(ev.get("kld") or {}).get("mean"), task_recovery=avg.get("recovery"),
        recovery=ev.get("recovery"), recovery_basis=ev.get("recovery_basis"),
        loads_in=[v["runtime"] for v in (rep.get("preflight") or {}).get("runtimes", []) if v["ok"]],
        seconds=(rep.get("seconds") or {}).get("total"), reused=rep.get("reused") or {},
        serving=_serving(rep.get("serving")))
    return out


def _serving(part: dict | None) -> dict | None:
    """A variant's serving figures for the table: decode tokens/s at batch 1 and the speed-ups against fp16."""
    if not part or not part.get("speedup"):
        return None
    return {"device": part["device"], "cpu": part["cpu"], "decode_tok_s": part["models"]["quantized"]["decode_tok_s"]["1"],
            "decode_speedup": part["speedup"]["decode_1"], "prefill_speedup": part["speedup"]["prefill_1"],
            "weight_memory_ratio": part["speedup"]["weight_memory"]}


def summary(release: dict, rows: list[dict]) -> dict:
    """release: id, model, revision, preset, state (and anything else worth keeping)."""
    return {**release, "variants": rows}


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2 ** 20:.1f} MiB"


def _f(x, fmt) -> str:
    return "n/a" if x is None else format(x, fmt)


def table(s: dict) -> list[list[str]]:
    served = any(r.get("serving") for r in s["variants"])
    named = any(r.get("scheme") for r in s["variants"])        # named schemes say which hardware they are for
    rows = [["variant", "state", "format", "bits", "group", "size", "bits/weight", "perplexity", "KLD", "recovery",
             "loads in"] + (["made for"] if named else []) + (["vLLM decode (batch 1) vs fp16"] if served else [])]
    for r in s["variants"]:
        ppl, sv = r.get("perplexity"), r.get("serving")
        rows.append([r["variant"], r["state"], " ".join(filter(None, (r.get("format"), r.get("scheme")))),
                     str(r.get("bits") or ""),
                     str(r.get("group_size") or ""), _mib(r.get("size_bytes")), _f(r.get("bits_per_weight"), ".2f"),
                     f"{ppl['quantized']:.3f} (fp16 {ppl['fp16']:.3f})" if ppl else "n/a",
                     _f(r.get("kld_mean"), ".4f"), report.pct(r.get("recovery")), ", ".join(r.get("loads_in") or [])]
                    + ([SCHEMES[r["scheme"]].hardware if r.get("scheme") else ""] if named else [])
                    + ([f"{sv['decode_tok_s']:.1f} tok/s, {sv['decode_speedup']:.2f}x" if sv else "n/a"] if served else []))
    return rows


def notes(s: dict) -> list[str]:
    out = [f"{r['variant']}: {r['note']}." for r in s["variants"] if r.get("note")]
    out += [f"{r['variant']} {r['state']}: {r['error']}" for r in s["variants"] if r.get("error")]
    shared = s.get("shared")
    if shared:
        out.append("Done once for the release and reused by the variants: " +
                   ", ".join(f"{k} ({n}x)" for k, n in sorted(shared.items())) + ".")
    return out


def readme(s: dict) -> str:
    rev, name = s.get("revision"), report.shown_ref(s["model"])
    front = ["---", *([f"base_model: {s['model']}"] if s.get("hub_model") else []), "base_model_relation: quantized",
             "tags:", "- quantized", "- quantfarm", *(f"- {f}" for f in sorted({r['format'] for r in s['variants']
                                                                              if r.get('format')})), "---"]
    lines = [*front, "", f"# {md(name)}: quantized release", "",
             f"Source {md_code(name)} at revision {md_code(rev)}; release state **{md(s['state'])}**"
             + (f" (preset {md_code(s['preset'])})" if s.get("preset") else "")
             + ". One folder per variant, each with its "
             "own model card (README.md), report.json and report.html.", "",
             report.markdown_table([[md(c) for c in r] for r in table(s)]), "",
             "Recovery: quantized / fp16 on the evaluation's basis (task average when tasks ran, else fp16 / quantized "
             "perplexity). KLD: mean per-token KL(fp16 || quantized).", ""]
    lines += [f"- {no_html(n)}" for n in notes(s)]
    return "\n".join(lines) + "\n"


def plot(s: dict) -> str | None:
    """Recovery against size and, where serving was measured, against vLLM decode speed-up: one point per
    variant, the trade-off at a glance."""
    pts = [r for r in s["variants"] if r.get("size_bytes") and r.get("recovery") is not None]
    if not pts:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    served = [r for r in pts if r.get("serving")]
    fig, axes = plt.subplots(1, 2 if served else 1, figsize=(10 if served else 6, 3.5), squeeze=False)
    panels = [(axes[0][0], pts, lambda r: r["size_bytes"] / 2 ** 20, "artifact size (MiB)")]
    if served:
        panels.append((axes[0][1], served, lambda r: r["serving"]["decode_speedup"],
                       "vLLM decode speed-up vs fp16 (batch 1" + (", CPU)" if served[0]["serving"]["cpu"] else ")")))
    for ax, rows, xof, xlabel in panels:
        ax.scatter([xof(r) for r in rows], [100 * r["recovery"] for r in rows])
        for r in rows:
            ax.annotate(r["variant"], (xof(r), 100 * r["recovery"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("recovery (%)")
    png = plots.png_base64(fig)
    plt.close(fig)
    return png


def html_page(s: dict) -> str:
    title = f"{report.shown_ref(s['model'])}: quantized release"
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>Revision <code>{html.escape(str(s.get('revision')))}</code>; state <b>{html.escape(s['state'])}</b>.</p>",
             report.html_table(table(s)),
             "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes(s)) + "</ul>"]
    png = plot(s)
    if png:
        parts += ["<h2>Recovery against size and serving speed</h2>",
                  f'<img alt="recovery against size and serving speed" src="data:image/png;base64,{png}">']
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.2em .6em}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def write(folder, s: dict) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("release.json", json.dumps(s, indent=2) + "\n"), ("README.md", readme(s)),
                       ("index.html", html_page(s))):
        write_atomic(folder / name, text)
