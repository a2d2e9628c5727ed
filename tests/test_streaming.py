"""Streaming vectors: a vector split across many chunks or shards gives exactly what the in-memory path gives."""

import copy
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from feddem.client.secure_upload import weighted_chunks
from feddem.client.upload import upload_weighted_vector
from feddem.common.digests import stored_digest, vector_digest
from feddem.common.errors import FeddemError
from feddem.common.modeling import build_model, export_merged, model_tensors, tiny_llama_config
from feddem.common.stored_tensors import flat_chunks, float32_arrays
from feddem.common.hf_weights import INDEX, open_tensors, save_sharded
from feddem.common.vector_io import load_vector, save_vector, write_safetensors
from feddem.common.vector_records import vector_from_record
from feddem.common.vectors import (
    apply_vector, cast, check_vector, extract_vector, merged, merged_tensors, parameters_of, specs_of,
)

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture
def base_and_vector(tmp_path):
    base = build_model(tiny_llama_config(**SMALL), seed=0)
    base.save_pretrained(tmp_path / "base")
    tuned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=gen))
    return base, extract_vector(tuned, parameters_of(base))


def test_sharded_streaming_export_loads_and_equals_the_in_memory_merge(tmp_path, base_and_vector):
    base, vector = base_and_vector
    save_vector(vector, tmp_path / "vector.safetensors")
    stored = load_vector(tmp_path / "vector.safetensors")
    out = tmp_path / "merged"
    files = export_merged(str(tmp_path / "base"), stored, out, max_shard_size=20_000)  # ~100 KB model: many shards
    assert len(files) > 3 and (out / INDEX).is_file()
    index = json.loads((out / INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(files)
    assert all((out / f).stat().st_size <= 20_000 + 4096 or len(load_file(out / f)) == 1 for f in files)

    expected = copy.deepcopy(base)
    apply_vector(expected, vector)  # the in-memory merge
    loaded = AutoModelForCausalLM.from_pretrained(out)
    got = dict(loaded.named_parameters())
    for name, p in expected.named_parameters():
        assert torch.equal(got[name], p), name
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied


def test_one_shard_is_a_plain_model_file_and_bf16_bases_stay_bf16(tmp_path, base_and_vector):
    base, vector = base_and_vector
    base.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    files = export_merged(str(tmp_path / "bf16"), vector, tmp_path / "out", max_shard_size=10**9)
    assert files == ["model.safetensors"] and not (tmp_path / "out" / INDEX).exists()
    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    apply_vector(bf16, vector)  # float32 arithmetic, stored back in bf16
    for name, p in bf16.named_parameters():
        assert torch.equal(stored[name], p), name


@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d_dtype", [torch.float32, torch.bfloat16])
def test_the_merge_arithmetic_is_one_float32_addition_in_every_dtype_and_in_place(p_dtype, d_dtype):
    """`merged` and the in-place `apply_vector` (block by block through a float32 scratch where a dtype is 16-bit,
    over more than one block) give exactly float32(p) + scale * float32(d), rounded once to p's dtype."""
    gen = torch.Generator().manual_seed(3)
    n = 300_007  # more than one merge block, and not a multiple of any SIMD width
    p = torch.randn(n, generator=gen).to(p_dtype)
    d = (torch.randn(n, generator=gen) * 1e-2).to(d_dtype)
    expected = torch.add(p.float(), d.float(), alpha=0.37).to(p_dtype)
    assert torch.equal(merged(p, d, 0.37), expected)
    model = torch.nn.Linear(n, 1, bias=False).to(p_dtype)
    with torch.no_grad():
        model.weight.copy_(p.view(1, n))
    apply_vector(model, {"weight": d.view(1, n)}, scale=0.37)
    assert torch.equal(model.weight.detach().view(-1), expected)


def test_streaming_merge_of_a_model_state_matches_apply_vector(base_and_vector):
    base, vector = base_and_vector
    expected = copy.deepcopy(base)
    apply_vector(expected, vector, scale=0.5)
    merged = {name: t.clone() for name, t in merged_tensors(model_tensors(base), vector, scale=0.5)}
    assert "lm_head.weight" not in merged  # a tied weight once, as save_pretrained writes it
    for name, p in expected.named_parameters():
        assert torch.equal(merged[name], p), name
    with pytest.raises(FeddemError, match="no parameter"):
        list(merged_tensors(model_tensors(base), {"nope.weight": torch.zeros(2)}))


def test_flat_chunks_span_tensors_in_the_given_order(base_and_vector):
    _, vector = base_and_vector
    names = sorted(vector)
    expected = torch.cat([vector[n].reshape(-1) for n in names]).numpy()
    for size in (1, 777, expected.size, expected.size + 5):
        chunks = list(flat_chunks(vector, names, size))
        assert [o for o, _ in chunks] == list(range(0, expected.size, size))
        assert all(c.size == size for _, c in chunks[:-1])
        assert np.array_equal(np.concatenate([c for _, c in chunks]), expected)


@pytest.mark.parametrize("stored_as", ["tensors", "file f32", "file bf16"])
def test_flat_chunks_of_a_span_are_that_slice_of_the_flat_vector(tmp_path, base_and_vector, stored_as):
    """Spans (a part of a masked upload) that start and end inside tensors, at their edges, or cover everything."""
    _, vector = base_and_vector
    names = sorted(vector)
    if stored_as == "tensors":
        source = vector
    else:
        dtype = torch.bfloat16 if stored_as.endswith("bf16") else torch.float32
        save_vector({n: t.to(dtype) for n, t in vector.items()}, tmp_path / "v.safetensors")
        source = float32_arrays(tmp_path / "v.safetensors")
    expected = np.concatenate([np.asarray(source[n], dtype=np.float32).reshape(-1) for n in names])
    edge = vector[names[0]].numel()
    for lo, hi in [(0, expected.size), (5, 17), (edge, edge + 1), (edge - 3, expected.size), (0, edge)]:
        chunks = list(flat_chunks(source, names, 7, span=(lo, hi)))
        assert [o for o, _ in chunks] == list(range(lo, hi, 7))
        assert np.array_equal(np.concatenate([c for _, c in chunks]), expected[lo:hi]), (lo, hi)


def test_secure_upload_chunks_equal_the_whole_weighted_clipped_vector(tmp_path, base_and_vector):
    _, vector = base_and_vector
    save_vector(vector, tmp_path / "v.safetensors")
    lazy = load_vector(tmp_path / "v.safetensors")
    names = sorted(vector)
    whole = torch.cat([(vector[n] * 3.0).reshape(-1) for n in names]).numpy()
    clip = float(np.quantile(np.abs(whole), 0.9))
    parts = list(weighted_chunks(lazy, names, 3.0, clip, size=1000))
    assert np.array_equal(np.concatenate([c for _, c, _ in parts]), np.clip(whole, -clip, clip))
    assert sum(n for _, _, n in parts) == int(np.count_nonzero(np.abs(whole) > clip)) > 0
    with pytest.raises(FeddemError, match="layout"):
        list(weighted_chunks(lazy, names[1:], 1.0, 1.0))


def test_streamed_files_round_trip_with_their_digest(tmp_path, base_and_vector):
    _, vector = base_and_vector
    save_vector(vector, tmp_path / "v.safetensors")
    assert stored_digest(tmp_path / "v.safetensors") == vector_digest(vector)  # written while streaming
    plain = load_file(tmp_path / "v.safetensors")  # an ordinary safetensors file
    lazy = load_vector(tmp_path / "v.safetensors", verify=True)
    assert set(plain) == set(lazy) == set(vector)
    assert all(torch.equal(plain[n], vector[n]) and torch.equal(lazy[n], vector[n]) for n in vector)
    save_vector(lazy, tmp_path / "copy.safetensors")  # lazy in, streamed out
    assert stored_digest(tmp_path / "copy.safetensors") == vector_digest(vector)
    data = bytearray((tmp_path / "v.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / "v.safetensors").write_bytes(bytes(data))
    with pytest.raises(FeddemError, match="corrupt"):
        load_vector(tmp_path / "v.safetensors", verify=True)
    specs = specs_of(vector)
    with pytest.raises(FeddemError, match="expected"):  # a stream that does not follow its plan
        write_safetensors(tmp_path / "bad.safetensors", specs, reversed(list(vector.items())))
    assert not (tmp_path / "bad.safetensors").exists() and not list(tmp_path.glob("*bad*.tmp"))


def test_records_and_plain_uploads_are_read_lazily_and_exactly(tmp_path, base_and_vector):
    _, vector = base_and_vector
    save_vector(vector, tmp_path / "v.safetensors")
    record = upload_weighted_vector(load_vector(tmp_path / "v.safetensors"), 0.25)
    back = vector_from_record(record)
    assert set(back) == set(vector)
    assert all(torch.equal(back[n], vector[n] * 0.25) for n in vector)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_vectors_on_disk_and_on_the_wire_are_half_the_bytes_and_exact(tmp_path, base_and_vector, dtype):
    """A 16-bit stored vector is the float32 one rounded once; its plain upload is w * d formed in float32 and
    rounded once more, sent as 16-bit arrays (bfloat16 as raw bytes), which the server reads back bit for bit."""
    from flwr.common.serde import array_from_proto, array_to_proto

    _, vector = base_and_vector
    save_vector(cast(vector, torch.float32), tmp_path / "f32.safetensors")
    save_vector(cast(vector, dtype), tmp_path / "half.safetensors")
    assert (tmp_path / "half.safetensors").stat().st_size < 0.51 * (tmp_path / "f32.safetensors").stat().st_size
    stored = load_vector(tmp_path / "half.safetensors", verify=True)
    assert all(stored[n].dtype == dtype and torch.equal(stored[n], vector[n].to(dtype)) for n in vector)

    record = upload_weighted_vector(stored, 0.25, dtype)
    wire = {n: array_from_proto(array_to_proto(a)) for n, a in record.items()}  # through Flower's protobuf
    assert sum(len(a.data) for a in wire.values()) < 0.51 * 4 * sum(t.numel() for t in vector.values()) + 4096
    back = vector_from_record(ArrayRecord(wire))
    check_vector(back, vector, "upload", dtype)
    assert all(torch.equal(back[n], (stored[n].float() * 0.25).to(dtype)) for n in vector)
    with pytest.raises(FeddemError, match=f"has dtype {dtype}, expected torch.float32"):
        check_vector(back, vector, "upload of site-0")


def test_malformed_16_bit_uploads_and_values_beyond_float16_are_named(base_and_vector):
    _, vector = base_and_vector
    name = next(iter(vector))
    record = upload_weighted_vector(vector, 1.0, torch.bfloat16)
    cut = record[name]
    record[name] = Array(dtype="bfloat16", shape=cut.shape, stype=cut.stype, data=cut.data[:-2])
    with pytest.raises(FeddemError, match=f"array '{name}': .* bytes do not hold a bfloat16 tensor"):
        vector_from_record(record)[name]
    huge = {name: torch.full((3,), 1e5)}
    with pytest.raises(FeddemError, match=f"'{name}' .*beyond float16's range"):
        upload_weighted_vector(huge, 1.0, torch.float16)
    assert upload_weighted_vector(huge, 1.0, torch.bfloat16)[name].dtype == "bfloat16"  # bfloat16 holds it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_secure_stages_read_stored_vectors_with_numpy_exactly_as_torch_does(tmp_path, base_and_vector, dtype):
    """`common.stored_tensors` (numpy only) gives the float32 values torch gives, for every stored dtype."""
    _, vector = base_and_vector
    path = tmp_path / "v.safetensors"
    save_vector(cast(vector, dtype), path)
    arrays, stored = float32_arrays(path), load_vector(path)
    assert sorted(arrays) == sorted(vector)
    assert all(np.array_equal(arrays[n], stored[n].float().reshape(-1).numpy()) for n in vector)
    with pytest.raises(FeddemError, match="not a readable safetensors file"):
        (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
        float32_arrays(tmp_path / "bad.safetensors")


def test_the_client_app_and_its_secure_stages_load_without_torch():
    """In a deployment each message starts a fresh process: the secure stages must not pay for torch."""
    code = textwrap.dedent("""
        import sys
        import feddem.client.app, feddem.client.secure_upload
        from feddem.common.config import RunConfig
        RunConfig.from_record({"vector-dtype": "bfloat16"})
        heavy = sorted(m for m in ("torch", "datasets", "peft", "transformers.modeling_utils") if m in sys.modules)
        print(heavy)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_resharding_a_model_folder_keeps_every_tensor(tmp_path, base_and_vector):
    base, _ = base_and_vector
    source = open_tensors(tmp_path / "base")
    files = save_sharded(tmp_path / "re", specs_of(source), source.items(), max_shard_size=30_000)
    again = open_tensors(tmp_path / "re")
    assert len(files) > 1 and list(again) == list(source)
    assert all(torch.equal(again[n], source[n]) for n in source)
    single = save_sharded(tmp_path / "re", specs_of(source), source.items(), max_shard_size=10**9)
    assert single == ["model.safetensors"] and not (tmp_path / "re" / INDEX).exists()  # stale shards removed
    assert not list((tmp_path / "re").glob("model-*"))


PEAK = textwrap.dedent("""
    import json, sys
    from transformers import AutoConfig
    from feddem.common.modeling import export_merged
    from feddem.common.vector_io import load_vector
    def status(key):  # KiB
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
    folder, out = sys.argv[1], sys.argv[2]
    vector = load_vector(folder + "/vector.safetensors")
    AutoConfig.from_pretrained(folder + "/base")  # imports done
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
    start = status("VmRSS")
    export_merged(folder + "/base", vector, out, max_shard_size=32 << 20)
    print(json.dumps({"start": start, "peak": status("VmHWM")}))
""")


def test_streaming_export_holds_a_few_tensors_not_the_model(tmp_path):
    """A 16-tensor 'model' of 16 x 4M floats (256 MB): merging and exporting it stays far below one model size."""
    names = [f"layer{i:02d}.weight" for i in range(16)]
    folder = tmp_path / "m"
    shape = (2048, 2048)
    save_sharded(folder / "base", {n: (torch.float32, shape) for n in names},
                 ((n, torch.full(shape, float(i))) for i, n in enumerate(names)), max_shard_size=64 << 20)
    (folder / "base" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_vector({n: torch.full(shape, 0.5) for n in names}, folder / "vector.safetensors")
    run = subprocess.run([sys.executable, "-c", PEAK, str(folder), str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    grown = (figures["peak"] - figures["start"]) * 1024
    model_bytes = 16 * 2048 * 2048 * 4
    assert grown < 0.6 * model_bytes, f"export grew RSS by {grown / 2**20:.0f} MiB for a {model_bytes >> 20} MiB model"
    merged = open_tensors(tmp_path / "out")
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) == 8
    assert all(torch.equal(merged[n], torch.full(shape, i + 0.5)) for i, n in enumerate(names))


def test_secure_sum_of_vectors_split_across_many_chunks(tmp_path, base_and_vector, monkeypatch):
    """The site masks its stored vector in many small chunks (spanning tensors), the server adds them as they come
    and unmasks in small blocks in place: the sum is the exact weighted sum within the secure bound."""
    import feddem.client.secure_upload as site_side
    import feddem.server.secure_aggregation as server_side
    from feddem.common.site_context import SiteContext
    from feddem.common.config import RunConfig
    from flwr.app import ConfigRecord
    from tests.fakegrid import RUN_ID, FakeGrid, task_identity

    nodes = [101, 202, 303, 404]
    base, _ = base_and_vector
    shapes = {name: p.shape for name, p in base.named_parameters()}
    gen = torch.Generator().manual_seed(5)
    vectors = {}
    for i, node in enumerate(nodes):
        vectors[node] = {name: 1e-2 * torch.randn(shape, generator=gen) for name, shape in shapes.items()}
        save_vector(vectors[node], SiteContext(i, f"site-{i}", tmp_path / f"site-{i}").vector_path(RUN_ID))
    chunks = []
    check = server_side._check_masked
    monkeypatch.setattr(site_side, "CHUNK", 1000)
    monkeypatch.setattr(server_side, "_BLOCK", 777)
    monkeypatch.setattr(server_side, "_check_masked", lambda record, *a: chunks.append(len(record)) or
                        check(record, *a))
    weights = dict(zip(nodes, [0.1, 0.2, 0.3, 0.4]))
    cfg = RunConfig(sites=4, model=str(tmp_path / "base"), device="cpu", timeout=5.0)
    with task_identity():
        result = server_side.secure_sum(FakeGrid(tmp_path, nodes), cfg, ConfigRecord(
            {"model-ref": str(tmp_path / "base"), "model-checksum": ""}), weights, sorted(shapes), shapes)
    total = sum(p.numel() for p in base.parameters())
    assert result.survivors == nodes and chunks == [math.ceil(total / 1000) + 1] * 4  # + the check block
    for name in shapes:
        exact = sum(weights[n] * vectors[n][name].double() for n in nodes)
        assert (result.aggregate[name].double() - exact).abs().max() <= result.error_bound, name
