"""How the commands that run work in this process (quantize, release, merge) print its progress; a farm job's
comes from the server's event stream (client.follow, `submit --wait`)."""
import sys


class ProgressPrinter:
    """Step lines and a per-layer bar on stderr, for runs in this process."""

    def __init__(self):
        self.bar = None

    def on_step(self, step):
        if self.bar is not None:
            self.bar.clear()          # a step line never runs into the progress bar
        print(f"[quantfarm] {step}", file=sys.stderr, flush=True)

    def on_layer(self, rep, total):
        from tqdm import tqdm
        if self.bar is None or self.bar.total != total or self.bar.n >= total:
            self.bar = tqdm(total=total, initial=rep.index, desc="layers", unit="layer", file=sys.stderr)
        worst = max((m.get("rel_error", 0.0) for m in rep.modules.values()), default=0.0)
        self.bar.set_postfix_str(f"{rep.seconds:.1f}s, worst rel err {worst:.2e}")
        self.bar.update(1)
        if self.bar.n >= total:
            self.bar.close()

    @property
    def layers_done(self) -> int:
        return self.bar.n if self.bar is not None else 0

    def close(self):
        if self.bar is not None:
            self.bar.close()
