"""`quantfarm release`: every variant of one model, here (one process, shared work) or on a farm (--server)."""
import json
import sys

from .args import HelpWithDefaults, data_arguments, model_arguments, shared_from_args, size_for_device


def add_parsers(sub):
    p = sub.add_parser("release", formatter_class=HelpWithDefaults,
                       help="quantize one model into a release of variants (a preset or a variants file)")
    model_arguments(p)
    p.add_argument("--variants", required=True, metavar="PRESET|FILE",
                   help="vllm | thebloke, or a YAML/JSON file with a list of variants (algorithm, format, bits, "
                        "group_size, sym, act_order, name, ...)")
    data_arguments(p)
    p.add_argument("--out", help="release folder: one folder per variant plus the summary (runs here)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace variant folders quantfarm wrote before")
    p.add_argument("--no-baseline-cache", action="store_true", help="recompute the fp16 baseline, store nothing")
    p.add_argument("--server", help="submit the release to a quantfarm server instead of running it here")
    p.add_argument("--token", help="API token for --server")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("releases", formatter_class=HelpWithDefaults,
                       help="list a quantfarm server's releases, or show one with its variants")
    p.add_argument("release_id", nargs="?", help="a release id: its summary table")
    p.add_argument("--model", help="only releases of this model")
    p.add_argument("--server", help="the server (QUANTFARM_SERVER, default http://127.0.0.1:8600)")
    p.add_argument("--token", help="API token (QUANTFARM_TOKEN)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_releases)


def release_spec(a):
    from service.job.release import ReleaseSpec, load_variants
    return ReleaseSpec(**shared_from_args(a), **load_variants(a.variants))


def cmd_release(a) -> int:
    from core.errors import SpecError
    if a.server:
        from .client import Client
        spec = release_spec(a)
        view = Client(a.server, a.token).post_release(spec.model_dump(mode="json"))
        print(json.dumps(view, indent=2) if a.json else release_text(view))
        return 0
    if not a.out:
        raise SpecError("give --out DIR to run the release here, or --server URL to submit it to a farm")
    from service.job import release
    from service.job.context import JobContext, pick_device

    from .args import baseline_cache
    from .progress import ProgressPrinter
    sizing = size_for_device(a, pick_device(a.device))
    spec = release_spec(a)
    progress = ProgressPrinter()

    def on_variant(name, i, n):
        progress.close()
        print(f"[quantfarm] variant {i + 1}/{n}: {name}", file=sys.stderr, flush=True)

    ctx = JobContext(a.out, device=a.device, cache_dir=baseline_cache(a), overwrite=a.overwrite,
                     on_step=progress.on_step, on_layer=progress.on_layer)
    s = release.run(spec, ctx, on_variant=on_variant)
    progress.close()
    if sizing:
        print(f"note: {sizing}", file=sys.stderr)
    print(json.dumps(s, indent=2) if a.json else release_text(s))
    return 0 if s["state"] == "succeeded" else 3


def cmd_releases(a) -> int:
    from .client import Client
    c = Client(a.server, a.token)
    if a.release_id:
        view = c.release(a.release_id)
        print(json.dumps(view, indent=2) if a.json else release_text(view))
        return 0
    listing = c.releases(model=a.model)
    if a.json:
        print(json.dumps(listing, indent=2))
        return 0
    for r in listing["releases"]:
        states = ", ".join(f"{v['variant']} {v['state']}" for v in r["variants"])
        print(f"{r['id'][:12]}  {r['state']:<9}  {r['model']} @ {r['revision'][:12]}  ({states})")
    return 0


def release_text(s: dict) -> str:
    from evaluation import release_report, report
    head = [f"release   {s.get('id') or s.get('folder') or ''}".rstrip(),
            f"model     {s['model']} @ {s.get('revision')}", f"state     {s['state']}"]
    return "\n".join(head + ["", report.text_table(release_report.table(s)), "",
                             *release_report.notes(s)])
