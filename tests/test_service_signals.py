"""Signals to `quantfarm serve` (issue 15): SIGTERM and SIGINT stop its workers before it exits; after
SIGKILL its workers exit within one lease period, and a restart never runs more workers than configured."""
import os
import signal
import time
from pathlib import Path

import pytest

from test_service import Server, group_pids, kill_group


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(what)


def _polling(srv: Server, n: int, earlier: int = 0) -> list[int]:
    """Pids of serve's `n` workers once they poll the store (imports done, parent watch armed); `earlier`:
    polling lines an earlier serve left in the same log."""
    _wait(lambda: (srv.home / "serve.log").read_text().count(" polling ") >= n + earlier, 120,
          f"{n} workers polling")
    pids = srv.workers()
    assert len(pids) == n, pids
    return pids


def workers_of(home: Path) -> list[int]:
    """Every live worker process on this machine that serves `home`."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"worker" in cmd and str(home).encode() in cmd and state != "Z":
            out.append(int(d.name))
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_workers_before_serve_exits(tmp_path, sig):
    srv = Server(tmp_path / "home", f"sqlite:///{tmp_path}/store.db", workers=2)
    try:
        _polling(srv, 2)
        srv.proc.send_signal(sig)
        code = srv.proc.wait(timeout=60)
        assert code >= 0, f"serve died of signal {-code} instead of shutting down"
        assert group_pids(srv.proc.pid) == [] and workers_of(srv.home) == []
    finally:
        srv.close()


def test_sigkill_of_serve_workers_exit_within_a_lease_and_restart_keeps_count(tmp_path):
    lease = 6.0
    home, db = tmp_path / "home", f"sqlite:///{tmp_path}/store.db"
    srv = Server(home, db, workers=2, lease=lease)
    try:
        _polling(srv, 2)
        os.kill(srv.proc.pid, signal.SIGKILL)
        t0 = time.time()
        _wait(lambda: not workers_of(home), lease, "workers still alive one lease after SIGKILL of serve")
        print(f"\nworkers gone {time.time() - t0:.2f} s after SIGKILL of serve (lease {lease:.0f} s)")
        kill_group(srv.proc.pid)

        again = Server(home, db, workers=2, lease=lease)
        try:
            _polling(again, 2, earlier=2)
            for _ in range(10):                          # and stays at two
                assert len(workers_of(home)) == 2, workers_of(home)
                time.sleep(0.3)
        finally:
            again.close()
        assert workers_of(home) == []
    finally:
        srv.close()
