"""The FreeSWITCH side keeps running while its database waits (issue: SQLite's busy wait froze gevent).

gevent runs everything in one OS thread, so a decision waiting for SQLite's write lock would stop
every greenlet. The connector runs its SQL in one native thread (:class:`OffHub`); this test holds
the write lock from another connection and checks that a greenlet keeps ticking meanwhile and that
the decisions complete once the lock is gone. It runs in a child process: gevent's monkey-patching
is process-wide.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sqlite3, sys, time
from gevent import monkey
monkey.patch_all()
import gevent
from gevent.threadpool import ThreadPool
from forum_bridge.adapters.freeswitch.offhub import OffHub
from forum_bridge.config import load_settings
from forum_bridge.core import LoggedOn
from forum_bridge.service import BridgeService, utcnow
from forum_bridge.store.database import Database

path = sys.argv[1]
url = "sqlite:///" + path
settings = load_settings(environ={}, overrides={"database.url": url, "licences.count": 5, "node.name": "fs1"})
database = Database(url)
database.upgrade()
bridge = BridgeService(settings, database)
bridge.start()
bridge.import_subscribers("1000,1000\n")
bridge.apply(LoggedOn("1000", at=utcnow(), contact="sip:1000@127.0.0.1"))
service = OffHub(bridge, ThreadPool(1))
ticks = []

def ticker():
    while True:
        ticks.append(time.monotonic())
        gevent.sleep(0.01)

clock = gevent.spawn(ticker)
holder = sqlite3.connect(path, isolation_level=None)
holder.execute("BEGIN IMMEDIATE")
calls = [gevent.spawn(service.authorize, "1000", "600", channel=f"uuid-{i}") for i in range(3)]
status = gevent.spawn(service.status)
gevent.sleep(0.5)
during = len(ticks)
waiting = sum(not g.ready() for g in calls)
holder.execute("ROLLBACK")
gevent.joinall([*calls, status], timeout=20)
print(json.dumps({
    "ticks_while_locked": during,
    "decisions_waiting_while_locked": waiting,
    "reasons": [g.value.reason.value if g.value is not None else None for g in calls],
    "status_used": status.value["licences"]["used"] if status.value else None,
}))
"""


def test_a_decision_waiting_for_the_sqlite_lock_does_not_stop_the_other_greenlets(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "fs.db")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # The lock was really held: the decisions waited for it ...
    assert report["decisions_waiting_while_locked"] == 3
    # ... while the hub went on (about 50 ticks in 0.5 s; a frozen hub makes at most one).
    assert report["ticks_while_locked"] >= 10, report
    assert sorted(report["reasons"]) == ["licence_acquired", "licensed", "licensed"]
    assert report["status_used"] == 1
