"""Benchmark: one billion-parameter vector through feddem's secure round, merge and export, with peak memory per
process measured.

Stages, each in its own process so that each peak is its own (VmHWM from /proc, reset after the imports; a process
that starts Python, torch and Flower holds a few hundred MB before any vector, which is reported too):
1. `base`: a Llama-style model of about `--params` parameters built from a config (no download), saved as a
   Hugging Face folder (sharded past `--max-shard-size`). Setup: timed, not part of the ratios.
2. `site` (once per site): load the base, change every weight a little (a stand-in for fine-tuning), extract the
   vector against the base's files and store it (`save_vector(extract_vector(...))`, streamed).
3. `server`: `server.secure_aggregation.secure_sum` over a Grid that runs the sites' real ClientApp: keys, shares and
   unmask shares in this process (small), each masked upload (the heavy stage, `client.secure_upload.sa_masked`)
   in its own `masked` process whose reply is handed to the server only when it pulls it, as a whole message, as
   Flower delivers it. Then the streaming merge (`merged_tensors` over the base's files) is timed on its own
   (GB/s of one vector), and `export_merged` writes the sharded model.
4. `copy`: a plain numpy copy of the same number of bytes, in the same run, as the throughput baseline.

`--upload-parts K`: each masked upload in K messages (run config `upload-parts`): the server holds its accumulator
plus 1/K of a vector, a masked-upload process 1/K.

`--vector-dtype bfloat16|float16`: the sites store their vectors in that dtype, and the secure round takes a
16-bit ring where its precision holds (`vector-dtype` in the run config): half the bytes on disk and on the wire.

Ratios: `server_peak_over_vector` = server peak RSS / vector bytes (float32, 4 B per parameter, whatever
`--vector-dtype`, so that runs compare);
`site_peak_over_model_plus_vector` = the largest site-process peak (train or masked upload) / (model + vector
bytes); `merge_gbps` (torch's default threads, every core, as the server merges) / `copy_gbps` (numpy's copy:
one core, numpy does not thread it); `merge_one_thread_gbps`, the same merge on one core; `add_gbps`, an in-memory numpy float32 add of the same output bytes (the
merge's arithmetic with its inputs already in memory: what the merge could reach at best), and `merge_over_add`. A sampled check compares a few tensors of the exported model with
base + sum_i w_i d_i. Writes `scale.json` to `--out`.

    python bench/scale.py --out /tmp/scale                   # 1B parameters, 4 sites (needs ~2 x 4 GB free RAM)
    python bench/scale.py --out /tmp/scale --params 1e8      # 100M
    python bench/scale.py --out /tmp/scale --vector-dtype bfloat16
    python bench/scale.py --out /tmp/scale --upload-parts 4
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 32000
SCALE = 1e-3  # size of the stand-in fine-tuning change


def _status(key: str) -> int:
    """A /proc/self/status figure in bytes."""
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith(key)).split()[1]) * 1024


def _reset_peak() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS; returns that RSS."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status("VmRSS")


def _memory(start: int) -> dict:
    import resource

    return {"start_rss": start, "peak_rss": _status("VmHWM"),
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def llama_config(params: float):
    """A Llama-style config of about `params` parameters (tied embeddings, head dim 64)."""
    from transformers import LlamaConfig

    hidden = max(128, 64 * round(math.sqrt(params / 192) / 64))
    inter = 64 * round(8 * hidden / 3 / 64)
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - VOCAB * hidden) / per_layer))
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=True,
                       max_position_embeddings=2048)


# --- roles (each runs in its own process) ------------------------------------------------------------------------

def role_base(args) -> dict:
    import torch

    from feddem.common.modeling import build_model, count_parameters

    start = time.perf_counter()
    with torch.device("cpu"):
        model = build_model(llama_config(args.params), seed=0)
    model.save_pretrained(args.dir / "base", max_shard_size=args.max_shard_size)
    return {"parameters": count_parameters(model), "seconds": time.perf_counter() - start}


def _site_dir(args, i: int) -> Path:
    return args.dir / "sites" / f"site-{i}"


def role_site(args) -> dict:
    import torch

    from feddem.common.modeling import base_tensors, load_model
    from feddem.common.config import RunConfig
    from feddem.common.vector_io import save_vector
    from feddem.common.vectors import cast, extract_vector
    from tests.fakegrid import RUN_ID

    ref = str(args.dir / "base")
    start_rss = _reset_peak()
    start = time.perf_counter()
    model = load_model(ref)
    loaded = time.perf_counter()
    gen = torch.Generator().manual_seed(1000 + args.node)
    with torch.no_grad():  # the stand-in for fine-tuning: a small change of every weight
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen), alpha=SCALE)
    tuned = time.perf_counter()
    path = _site_dir(args, args.node) / "runs" / str(RUN_ID) / "vector.safetensors"
    vector = extract_vector(model, base_tensors(ref, [n for n, _ in model.named_parameters()]))
    save_vector(cast(vector, RunConfig(vector_dtype=args.vector_dtype).torch_vector_dtype), path,
                metadata={"site": f"site-{args.node}"})
    done = time.perf_counter()
    return _memory(start_rss) | {"load_s": loaded - start, "tune_s": tuned - loaded, "extract_save_s": done - tuned}


def role_masked(args) -> dict:
    """One site's masked upload through the real ClientApp handler; the reply goes to disk for the server."""
    from flwr.app import Context
    from flwr.common.serde import message_from_proto, recorddict_from_proto, recorddict_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    from feddem.client.app import app as client_app
    from feddem.common import messages as M
    from tests.fakegrid import RUN_ID, task_identity

    box = args.dir / "box" / f"node-{args.node}"
    msg = message_from_proto(ProtoMessage.FromString((box / "request.bin").read_bytes()))
    state = recorddict_from_proto(ProtoRecordDict.FromString((box / "state.bin").read_bytes()))
    node_config = json.loads((box / "node_config.json").read_text())
    start_rss = _reset_peak()
    start = time.perf_counter()
    with task_identity():
        reply = client_app(msg, Context(run_id=RUN_ID, node_id=args.node, state=state, run_config={},
                                        node_config=node_config))
    seconds = time.perf_counter() - start
    if reply.has_error():
        raise RuntimeError(f"masked upload failed: {reply.error.reason}")
    content = reply.content
    index = []
    if M.MASKED in content.array_records:
        with open(box / "arrays.bin", "wb") as fh:
            for name, array in content.array_records[M.MASKED].items():
                fh.write(array.data)
                index.append([name, array.dtype, list(array.shape), array.stype, len(array.data)])
        del content.array_records[M.MASKED]
    (box / "arrays.json").write_text(json.dumps(index))
    (box / "reply.bin").write_bytes(recorddict_to_proto(content).SerializeToString())
    (box / "state.bin").write_bytes(recorddict_to_proto(state).SerializeToString())
    return _memory(start_rss) | {"seconds": seconds}


def _bench_grid(args, nodes):
    """FakeGrid (the real ClientApp behind Flower's serialisation) whose masked uploads run in their own process
    and reach the server only when it pulls them."""
    from flwr.app import Array, ArrayRecord, Message
    from flwr.common.serde import message_to_proto, recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    from feddem.common import messages as M
    from tests.fakegrid import FakeGrid

    class BenchGrid(FakeGrid):
        def __init__(self):
            super().__init__(args.dir / "sites", nodes)
            self.stage_seconds: dict[str, float] = {}
            self.sites: list[dict] = []
            self._pending: dict[str, tuple[Message, Path]] = {}

        def push_messages(self, messages):
            start = time.perf_counter()
            ids = super().push_messages(messages)
            kind = self.sent[-1] if self.sent else "?"
            self.stage_seconds[kind] = self.stage_seconds.get(kind, 0.0) + time.perf_counter() - start
            return ids

        def _deliver(self, msg):
            if msg.metadata.message_type != M.SA_MASKED:
                return super()._deliver(msg)
            node = msg.metadata.dst_node_id
            box = args.dir / "box" / f"node-{node}"
            box.mkdir(parents=True, exist_ok=True)
            (box / "request.bin").write_bytes(message_to_proto(msg).SerializeToString())
            context = self.contexts[node]
            (box / "state.bin").write_bytes(recorddict_to_proto(context.state).SerializeToString())
            (box / "node_config.json").write_text(json.dumps(dict(context.node_config)))
            figures = _run_role(args, "masked", node=node)
            self.sites.append(figures | {"node": node})
            state = recorddict_from_proto(ProtoRecordDict.FromString((box / "state.bin").read_bytes()))
            for key in list(context.state.keys()):
                del context.state[key]
            for key, record in state.items():
                context.state[key] = record
            self._pending[msg.metadata.message_id] = (msg, box)
            return None  # materialised in pull_messages

        def pull_messages(self, message_ids):
            out = []
            for message_id in list(message_ids):
                if message_id in self._pending:
                    msg, box = self._pending.pop(message_id)
                    content = recorddict_from_proto(ProtoRecordDict.FromString((box / "reply.bin").read_bytes()))
                    arrays = {}
                    with open(box / "arrays.bin", "rb") as fh:  # the whole upload in memory, as Flower delivers it
                        for name, dtype, shape, stype, size in json.loads((box / "arrays.json").read_text()):
                            arrays[name] = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=fh.read(size))
                    content[M.MASKED] = ArrayRecord(arrays)
                    out.append(Message(content, reply_to=msg))
            return out + super().pull_messages(message_ids)

    return BenchGrid()


def role_server(args) -> dict:
    import torch
    from flwr.app import ConfigRecord

    from feddem.common.config import RunConfig
    from feddem.common.modeling import export_merged
    from feddem.common.memory import release_memory
    from feddem.common.hf_weights import open_tensors
    from feddem.common.vector_io import open_vector
    from feddem.common.vectors import merged_tensors, shapes_of
    from feddem.server.secure_aggregation import secure_sum
    from tests.fakegrid import RUN_ID, task_identity

    ref = str(args.dir / "base")
    nodes = list(range(1, args.sites + 1))
    layout = sorted(open_vector(_site_dir(args, 0) / "runs" / str(RUN_ID) / "vector.safetensors"))
    shapes = {name: torch.Size(shape) for name, shape in shapes_of(open_tensors(ref)).items()}
    cfg = RunConfig(sites=args.sites, clip=1.0, min_peers=min(2, args.sites - 1), timeout=7200.0,
                    vector_dtype=args.vector_dtype, upload_parts=args.upload_parts)
    grid = _bench_grid(args, nodes)
    weights = {node: 1.0 / args.sites for node in nodes}
    start_rss = _reset_peak()
    t0 = time.perf_counter()
    with task_identity():
        result = secure_sum(grid, cfg, ConfigRecord({"model-ref": ref, "model-checksum": ""}), weights, layout,
                            shapes)
    t1 = time.perf_counter()
    aggregate = result.aggregate
    peak_aggregation = _status("VmHWM")
    base = open_tensors(ref)
    merged_bytes = 0
    # The merge's inputs warm, as the copy baseline's are ("pages touched before timing"): the base's files were last
    # read by the sites, a minute or more ago, and idle memory is slow to touch again on a VM (here, DAMON pages out
    # what sat idle 60 s and a first read of idle page cache runs at about half speed), which would time the machine's
    # memory reclaim rather than the merge. The aggregate was just written; the merge's own buffer stays in the timing.
    block = bytearray(16 << 20)
    for file in sorted(Path(ref).glob("*.safetensors")):
        with open(file, "rb") as fh:
            while fh.readinto(block):
                pass
    del block

    def merge() -> tuple[float, int]:  # the merge alone: base from its files + the sum, in memory
        total, start = 0, time.perf_counter()
        for _, t in merged_tensors(base, aggregate):
            total += t.numel() * 4 if t.dtype == torch.float32 else 0
            del t
            release_memory()
        return time.perf_counter() - start, total

    one_thread_s, merged_bytes = merge()  # one core, as the copy baseline
    torch.set_num_threads(os.cpu_count() or 1)  # as the server runs it: torch's default, every core
    merge_s, _ = merge()
    torch.set_num_threads(1)
    t3 = time.perf_counter()
    files = export_merged(ref, aggregate, args.dir / "merged", args.max_shard_bytes)
    t4 = time.perf_counter()
    memory = _memory(start_rss)
    vector_elems = sum(int(shapes[n].numel()) for n in layout)
    return memory | {
        "peak_rss_aggregation": peak_aggregation, "ring_bits": result.bits, "vector_elements": vector_elems,
        "merged_bytes": merged_bytes,
        "secure_sum_s": t1 - t0, "merge_s": merge_s, "merge_one_thread_s": one_thread_s, "export_s": t4 - t3, "export_files": len(files),
        "grid_push_s": grid.stage_seconds, "masked_sites": grid.sites, "error_bound": result.error_bound,
        "survivors": len(result.survivors)}


def role_copy(args) -> dict:
    """A plain numpy copy of `--bytes` bytes in 64 MB blocks (the throughput baseline), and a numpy float32 add
    of two such blocks into a third, over the same number of output bytes: the merge's own arithmetic with every
    input already in memory (its ceiling on this machine)."""
    import numpy as np

    block = 64 << 20
    src = np.ones(block // 4, dtype=np.float32)
    other = np.full_like(src, 0.5)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # pages touched before timing
    np.add(src, other, out=dst)

    def timed(step) -> float:
        total, start = 0, time.perf_counter()
        while total < args.bytes:
            step()
            total += block
        return time.perf_counter() - start

    copy_s = timed(lambda: np.copyto(dst, src))
    add_s = timed(lambda: np.add(src, other, out=dst))
    return {"bytes": -(-args.bytes // block) * block, "seconds": copy_s, "add_seconds": add_s}


ROLES = {"base": role_base, "site": role_site, "masked": role_masked, "server": role_server, "copy": role_copy}


def _run_role(args, role: str, **extra) -> dict:
    cmd = [sys.executable, __file__, "--role", role, "--dir", str(args.dir), "--params", str(args.params),
           "--sites", str(args.sites), "--max-shard-size", args.max_shard_size, "--vector-dtype", args.vector_dtype,
           "--upload-parts", str(args.upload_parts)]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"bench/scale.py: role {role} {extra} failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _check(args, report: dict) -> float:
    """Largest |exported - (base + sum_i w_i d_i)| over a few tensors, read from the files."""
    from feddem.common.hf_weights import open_tensors
    from feddem.common.vector_io import open_vector
    from tests.fakegrid import RUN_ID

    base, merged = open_tensors(args.dir / "base"), open_tensors(args.dir / "merged")
    vectors = [open_vector(_site_dir(args, i) / "runs" / str(RUN_ID) / "vector.safetensors")
               for i in range(args.sites)]
    names = [n for n in base if n.endswith("norm.weight")][:2] + [n for n in base if "layers.0." in n][:2]
    worst = 0.0
    for name in names:
        expected = base[name].float() + sum(v[name].float() for v in vectors) / args.sites
        worst = max(worst, float((merged[name].float() - expected).abs().max()))
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="", help="folder for scale.json (and the work files under work/)")
    parser.add_argument("--params", type=float, default=1e9, help="model and vector size (default 1e9)")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--vector-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the stored vectors; a 16-bit one also allows a 16-bit ring (default float32)")
    parser.add_argument("--upload-parts", type=int, default=1,
                        help="messages each masked upload is split into (run config upload-parts; default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the work files (model, vectors, export)")
    parser.add_argument("--role", choices=list(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--node", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from feddem.common.config import shard_size_bytes
    from feddem.common.errors import FeddemError

    try:
        args.max_shard_bytes = shard_size_bytes(args.max_shard_size)
    except FeddemError as error:
        parser.error(str(error))
    if args.role:
        import torch

        torch.set_num_threads(1)  # steadier on a shared machine; the server's merge is timed on every core too
        print(json.dumps(ROLES[args.role](args)))
        return 0
    if not args.out:
        parser.error("--out DIR is required")
    out = Path(args.out).resolve()
    args.dir = out / "work"
    if args.dir.exists():
        import shutil

        shutil.rmtree(args.dir)
    args.dir.mkdir(parents=True)
    stages: dict[str, float] = {}

    def timed(name, role, **extra):
        start = time.perf_counter()
        figures = _run_role(args, role, **extra)
        stages[name] = round(stages.get(name, 0.0) + time.perf_counter() - start, 2)
        return figures

    base = timed("base (setup)", "base")
    params = base["parameters"]
    vector_bytes = params * 4
    print(f"model: {params / 1e6:.1f}M parameters, vector {vector_bytes / 2**30:.2f} GiB, {args.sites} sites",
          flush=True)
    sites = [timed("site: load, tune, extract, save", "site", node=i) for i in range(args.sites)]
    server = timed("server: secure sum, merge, export", "server")
    copy = timed("copy baseline", "copy", bytes=server["merged_bytes"] or vector_bytes)
    masked = server.pop("masked_sites")
    site_peak = max([s["peak_rss"] for s in sites] + [m["peak_rss"] for m in masked])
    merge_gbps = server["merged_bytes"] / server["merge_s"] / 1e9
    merge_one_gbps = server["merged_bytes"] / server["merge_one_thread_s"] / 1e9
    copy_gbps = copy["bytes"] / copy["seconds"] / 1e9
    add_gbps = copy["bytes"] / copy["add_seconds"] / 1e9
    report = {
        "parameters": params, "sites": args.sites, "vector_bytes": vector_bytes, "model_bytes": vector_bytes,
        "vector_dtype": args.vector_dtype, "ring_bits": server["ring_bits"], "upload_parts": args.upload_parts,
        "cpus": os.cpu_count(),
        "server_peak_over_vector": round(server["peak_rss"] / vector_bytes, 3),
        "server_peak_above_start_over_vector": round((server["peak_rss"] - server["start_rss"]) / vector_bytes, 3),
        "server_start_rss_over_vector": round(server["start_rss"] / vector_bytes, 3),
        "site_peak_over_model_plus_vector": round(site_peak / (2 * vector_bytes), 3),
        "site_train_peak_over_model_plus_vector": round(max(s["peak_rss"] for s in sites) / (2 * vector_bytes), 3),
        "site_masked_peak_over_vector": round(max(m["peak_rss"] for m in masked) / vector_bytes, 3),
        "merge_gbps": round(merge_gbps, 3), "copy_gbps": round(copy_gbps, 3),
        "merge_over_copy": round(merge_gbps / copy_gbps, 3),
        "merge_one_thread_gbps": round(merge_one_gbps, 3),
        "merge_one_thread_over_copy": round(merge_one_gbps / copy_gbps, 3),
        "add_gbps": round(add_gbps, 3), "merge_over_add": round(merge_gbps / add_gbps, 3),
        "stages_s": stages | {
            "server: secure sum": round(server["secure_sum_s"], 2),
            "server: of which masked uploads (site processes)": round(sum(m["seconds"] for m in masked), 2),
            "server: merge (every core)": round(server["merge_s"], 2),
            "server: merge (one core)": round(server["merge_one_thread_s"], 2),
            "server: export": round(server["export_s"], 2)},
        "server": server, "site_processes": sites, "masked_processes": masked,
        "max_abs_error_sampled": _check(args, server), "error_bound": server["error_bound"],
    }
    (out / "scale.json").write_text(json.dumps(report, indent=2))
    for key in ("server_peak_over_vector", "server_peak_above_start_over_vector", "server_start_rss_over_vector",
                "site_peak_over_model_plus_vector", "site_masked_peak_over_vector", "merge_gbps", "copy_gbps",
                "add_gbps", "merge_over_add", "merge_over_copy", "merge_one_thread_gbps", "merge_one_thread_over_copy", "max_abs_error_sampled", "error_bound"):
        print(f"{key:40s} {report[key]}")
    for name, seconds in report["stages_s"].items():
        print(f"  {name:50s} {seconds:8.2f} s")
    print(out / "scale.json")
    if not args.keep:
        import shutil

        shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
