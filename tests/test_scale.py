"""Many simulated sites: the simulation stops what Ray leaves behind, and only that."""

import os
import subprocess
import sys
import time
import uuid

from feddem.server.simulation import TAG_VAR, _tagged_pids, stop_leftovers


def test_leftover_processes_of_a_run_are_stopped_and_others_are_not():
    tag = uuid.uuid4().hex
    sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
    ours = [subprocess.Popen(sleep, env=dict(os.environ, **{TAG_VAR: tag})) for _ in range(2)]
    other = subprocess.Popen(sleep, env=dict(os.environ, **{TAG_VAR: "another-run"}))
    untagged = subprocess.Popen(sleep)
    try:
        deadline = time.monotonic() + 10
        while len(_tagged_pids(tag)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(_tagged_pids(tag)) == sorted(p.pid for p in ours)
        assert stop_leftovers(tag, grace=0.5) == 0
        assert all(p.wait(timeout=10) is not None for p in ours)
        assert other.poll() is None and untagged.poll() is None
    finally:
        for p in (*ours, other, untagged):
            p.kill()
            p.wait()
