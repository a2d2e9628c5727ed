"""Benchmark: the embedded default (`feddem simulate`) with many simulated sites on one machine.

Each site count runs once, in its own `feddem simulate` process (Flower's Simulation Engine, secure aggregation,
the embedded tiny model, small steps), with the synthetic domains repeated so that every site has a shard. The
base is pre-trained and cached before the first timed run. For each count it prints the wall time in total and
per site, the per-site time relative to the smallest count (about 1.0 = linear growth), the peak RSS of the whole
process tree (sampled), and how many of the run's processes were still alive afterwards (found by a tag in their
environment, 15 s after the run's own process exited; then stopped).

    python bench/sites.py                        # 5, 10, 20 and 50 sites
    python bench/sites.py --sites 5 10 --out /tmp/sites
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.processes import TAG_VAR, stop, tagged  # noqa: E402

DOMAINS = ["arithmetic", "records", "prose", "code"]


def _tree_rss(root: psutil.Process, tag: str) -> int:
    procs = {p.pid: p for p in tagged(tag)}
    try:
        procs[root.pid] = root
    except psutil.NoSuchProcess:
        pass
    total = 0
    for proc in procs.values():
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_sites(n: int, args, home: Path, out: Path) -> dict:
    data = "synthetic:" + ",".join(DOMAINS[i % len(DOMAINS)] for i in range(n))
    tag = f"sites-{n}-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, FEDDEM_HOME=str(home), HF_HUB_OFFLINE="1", **{TAG_VAR: tag})
    cmd = [sys.executable, "-m", "feddem.server.cli", "simulate", "--overwrite", "--out", str(out / f"sites-{n}"),
           "--sites", str(n),
           "--data", data, "--steps", str(args.steps), "--train-examples", str(args.train_examples),
           "--eval-examples", str(args.eval_examples), "--base-steps", str(args.base_steps),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--min-peers", str(min(args.min_peers, n - 1)), "--timeout", str(args.timeout)]
    log = out / f"sites-{n}.log"
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(root, tag))
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        code = proc.wait(timeout=args.timeout + 600)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = -9
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    deadline = time.monotonic() + 15.0  # Ray's own processes may take a few seconds to go after the driver exits
    while (left := tagged(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    names = []
    for proc in left:
        try:
            names.append(" ".join(proc.cmdline())[:120])
        except psutil.Error:
            pass
    if left:
        stop(left)
    report_path = out / f"sites-{n}" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    timings = report.get("timings", {})
    return {"sites": n, "ok": code == 0, "exit_code": code, "wall_s": round(seconds, 1),
            "wall_per_site_s": round(seconds / n, 2), "run_s": timings.get("total"), "timings": timings,
            "merged_sites": len(report.get("eval", {}).get("merged", {})) if report else 0,
            "failures": len(report.get("failures", {})) if report else None,
            "peak_tree_rss_mb": round(peak[0] / 2**20), "processes_left": len(left), "left": names,
            "log": str(log)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--train-examples", type=int, default=100)
    parser.add_argument("--eval-examples", type=int, default=20)
    parser.add_argument("--base-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--min-peers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per stage (and per run + 600)")
    parser.add_argument("--out", default="", help="folder for the runs, logs and sites.json (default: a temp dir)")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="feddem-sites-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    home = out / "home"

    import torch

    from feddem.common.base_model import BaseSettings, ensure_embedded_base

    ensure_embedded_base(BaseSettings(steps=args.base_steps), torch.device("cpu"), home=home)  # not timed

    rows = []
    print(f"{'sites':>5} {'ok':>3} {'wall s':>8} {'s/site':>7} {'per-site vs first':>18} {'peak tree RSS':>14} "
          f"{'left':>5}", flush=True)
    for n in sorted(args.sites):
        row = run_sites(n, args, home, out)
        row["per_site_vs_first"] = round(row["wall_per_site_s"] / rows[0]["wall_per_site_s"], 2) if rows else 1.0
        rows.append(row)
        print(f"{n:>5} {'yes' if row['ok'] else 'NO':>3} {row['wall_s']:>8.1f} {row['wall_per_site_s']:>7.2f} "
              f"{row['per_site_vs_first']:>18.2f} {row['peak_tree_rss_mb']:>11} MB {row['processes_left']:>5}",
              flush=True)
        (out / "sites.json").write_text(json.dumps({"cpus": os.cpu_count(), "settings": vars(args), "runs": rows},
                                                   indent=2))
    print(f"\n{out / 'sites.json'}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
