"""The report's plots (matplotlib, embedded in report.html as PNG data): recovery per task, the error
per layer, and serving speed against fp16."""
import base64
import io


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


def png_base64(fig) -> str:
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
    png = png_base64(fig)
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
        out.append(("Per-task score, fp16 vs quantized", png_base64(fig)))
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
                    png_base64(fig)))
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
        out.append(("Per-token KL divergence", png_base64(fig)))
        plt.close(fig)
    return out
