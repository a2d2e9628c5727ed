"""Benchmark: the same DEM run deployed (real SuperLink with TLS and SuperNode authentication, one real SuperNode per
site, `flwr run . <connection>`) and simulated (`feddem simulate`), side by side, in one script.

Both runs use the same run config (the embedded default unless told otherwise), the same base (pre-trained once,
first, in a FEDDEM_HOME of this script) and the same sites: site i's data is the synthetic shard that simulated
site i gets, written as files for the deployed SuperNode (its `data-path`). Every process listens on 127.0.0.1 and
is stopped by PID at the end. Prints wall time and the report's stage timings for both, and their ratio.

    python bench/deployment.py                                   # 3 sites, the embedded default (steps 200, ...)
    python bench/deployment.py --run-config "steps=20 train-examples=200 eval-examples=40 base-steps=30"
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent


def _config(text: str) -> dict:
    from flwr.common.config import parse_config_args

    return dict(parse_config_args([text])) if text.strip() else {}


def _write_shards(cfg, root: Path) -> list[tuple[Path, str]]:
    """Each simulated site's shard written as train/test jsonl files (what a deployed site holds)."""
    from feddem.common.site_context import SiteContext
    from feddem.client.site import load_site_shard

    folders = []
    for i in range(cfg.sites):
        shard = load_site_shard(cfg, SiteContext(i, f"site-{i}", root / "unused"))
        folder = root / "data" / f"site-{i}"
        folder.mkdir(parents=True)
        for split, rows in (("train", shard.train["text"]), ("test", shard.heldout["text"])):
            (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
        folders.append((folder, shard.name))
    return folders


def deployed(cfg_text: str, cfg, root: Path, env: dict) -> tuple[float, dict]:
    import psutil

    from feddem.server.certs import generate
    from tests.processes import TAG_VAR, free_ports, start, stop_tree, tagged, wait_for_port

    names = [f"site-{i}" for i in range(cfg.sites)]
    certs = root / "certs"
    generate(certs, names, ["localhost"])
    folders = _write_shards(cfg, root)
    tag = uuid.uuid4().hex
    env = dict(env, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", **{TAG_VAR: tag})
    (port,) = free_ports(1)
    procs = [start([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
                    "--ssl-certfile", str(certs / "superlink" / "server.crt"),
                    "--ssl-keyfile", str(certs / "superlink" / "server.key"), "--enable-supernode-auth",
                    "--host", "127.0.0.1", "--port", str(port)],
                   dict(env, FLWR_HOME=str(root / "flwr-superlink")), root / "superlink.log")]
    cli_env = dict(env, FLWR_HOME=str(root / "flwr-cli"))
    # sites sharing this machine get its cores in equal parts, as Ray gives each simulated site one CPU (a real
    # site has its own machine); without this, torch threads oversubscribe the cores and training is several x slower
    threads = str(max(1, (os.cpu_count() or 1) // cfg.sites))
    try:
        wait_for_port(port, procs[0], 120)
        (root / "flwr-cli").mkdir()
        (root / "flwr-cli" / "config.toml").write_text(
            f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\n'
            f'root-certificates = "{certs / "ca.crt"}"\n')
        for name, (folder, domain) in zip(names, folders):
            done = subprocess.run([str(BIN / "flwr"), "supernode", "register",
                                   str(certs / "sites" / name / "node.pub"), "bench", "--name", name],
                                  cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"registering {name} failed: {done.stdout}{done.stderr}")
            (runtime_port,) = free_ports(1)
            procs.append(start([str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                                "--root-certificates", str(certs / "ca.crt"),
                                "--auth-supernode-private-key", str(certs / "sites" / name / "node.key"),
                                "--host", "127.0.0.1", "--port", str(runtime_port), "--node-config",
                                f'data-path="{folder}" site-name="{name}" domain="{domain}" '
                                f'work-dir="{root / "work" / name}"'],
                               dict(env, FLWR_HOME=str(root / f"flwr-{name}"), OMP_NUM_THREADS=threads),
                               root / f"{name}.log"))
        out = root / "deployed-run"
        run_config = f'{cfg_text} out-dir="{out}"'.strip()
        started = time.perf_counter()
        result = subprocess.run([str(BIN / "flwr"), "run", ".", "bench", "--stream", "--run-config", run_config],
                                cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=cfg.timeout + 600)
        wall = time.perf_counter() - started
        (root / "serverapp.log").write_text(result.stdout + result.stderr)  # the ServerApp's log, streamed
        if result.returncode != 0 or not (out / "report.json").exists():
            raise RuntimeError(f"the deployed run failed:\n{(result.stdout + result.stderr)[-4000:]}")
        if not re.search(r"Successfully started run", result.stdout + result.stderr):
            raise RuntimeError("flwr run did not start a run")
        return wall, json.loads((out / "report.json").read_text())
    finally:
        stop_tree([psutil.Process(p.pid) for p in procs if p.poll() is None], tag)
        stop_tree(tagged(tag), tag)


def simulated(cfg, root: Path, env: dict) -> tuple[float, dict]:
    out = root / "simulated-run"
    from dataclasses import fields

    from feddem.server.cli import RENAMED

    args = [sys.executable, "-m", "feddem.server.cli", "simulate", "--overwrite", "--out", str(out)]
    for f in fields(cfg):  # the same settings as the deployed run, as `feddem simulate` options
        value = getattr(cfg, f.name)
        if f.name == "out_dir" or value in ("", None) or value is False:
            continue
        flag = "--" + RENAMED.get(f.name, f.name.replace("_", "-"))
        args += [flag] if value is True else [flag, str(value)]
    started = time.perf_counter()
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=cfg.timeout + 600)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"the simulated run failed:\n{(result.stdout + result.stderr)[-4000:]}")
    return wall, json.loads((out / "report.json").read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=3, help="sites (default: 3)")
    parser.add_argument("--run-config", default="", help="run-config overrides, as for `flwr run --run-config`")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)

    import torch

    from feddem.common.base_model import BaseSettings, ensure_embedded_base
    from feddem.common.config import RunConfig

    cfg_text = f"sites={args.sites} device=\"cpu\" {args.run_config}".strip()
    cfg = RunConfig.from_record(_config(cfg_text))
    root = Path(tempfile.mkdtemp(prefix="feddem-bench-deployment-"))
    env = dict(os.environ, FEDDEM_HOME=str(root / "home"), FLWR_TELEMETRY_ENABLED="0", HF_HUB_OFFLINE="1",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    os.environ["FEDDEM_HOME"] = env["FEDDEM_HOME"]
    ensure_embedded_base(BaseSettings(steps=cfg.base_steps, seed=cfg.seed), torch.device("cpu"))  # once, for both
    print(f"{cfg.sites} sites, run config: {cfg_text}; work folder {root}", flush=True)
    results = {}
    for name, run in (("simulation", lambda: simulated(cfg, root, env)),
                      ("deployment", lambda: deployed(cfg_text, cfg, root, env))):
        print(f"{name} ...", flush=True)
        wall, report = run()
        results[name] = {"wall_s": round(wall, 1), "timings": report["timings"],
                         "merged_mean_loss": sum(v["loss"] for v in report["eval"]["merged"].values())
                         / len(report["eval"]["merged"]), "aggregation": report["aggregation"]}
        print(f"  {wall:.1f} s wall; stages {report['timings']}", flush=True)
    sim, dep = results["simulation"], results["deployment"]
    print(f"\n{'':<12}{'wall s':>9}" + "".join(f"{k:>11}" for k in sim["timings"]) + f"{'merged loss':>13}")
    for name, r in results.items():
        print(f"{name:<12}{r['wall_s']:>9.1f}" + "".join(f"{r['timings'].get(k, 0):>11.1f}" for k in sim["timings"])
              + f"{r['merged_mean_loss']:>13.4f}")
    print(f"deployment/simulation wall time: {dep['wall_s'] / sim['wall_s']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
