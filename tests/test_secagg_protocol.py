"""SecAgg+ client/server state machines run in-process: exact sums, dropouts, tampering, refusals, bad input."""

from typing import NamedTuple

import numpy as np
import pytest

from feddem.common.secagg import (
    RefusalError,
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    TamperError,
    ThresholdError,
    error_bound,
    harary_neighbours,
    quantize,
)


class Summed(NamedTuple):
    """What a round's server gives: the survivors' sum and its bound per element."""

    total: np.ndarray
    error_bound: float
    survivors: list[int]
    dropped: list[int]


def add_whole(server, client_id, masked):
    """A client's whole masked vector (with its check block) streamed as one chunk."""
    server.add_masked_chunk(client_id, masked, 0)


def unmasked(server, shares, out_dtype=np.float32, block=4096):
    """recover_masks, then the sum read chunk by chunk (unmask_chunk), with the quantization error bound."""
    server.recover_masks(shares)
    length = server.params.vector_length
    total = np.concatenate([server.unmask_chunk(a, min(block, length - a), out_dtype)
                            for a in range(0, length, block)])
    return Summed(total, error_bound(server.params.ring, len(server.survivors), out_dtype),
                  server.survivors, server.dropped)


def _setup(ids, length, clip=1.0, **kw):
    params = SecAggParams.create(ids, length, clip, **kw)
    # clients get the parameters the way a transport carries them: as a dict of primitives
    clients = {i: SecAggClient(SecAggParams.from_dict(params.to_dict()), i) for i in params.client_ids}
    return params, clients, SecAggServer(params)


def _inputs(ids, length, clip=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-clip, clip, length).astype(np.float32) for i in ids}


def _run(
    ids,
    length,
    *,
    absent=(),
    drop_after_advertise=(),
    drop_after_share=(),
    silent_in_unmask=(),
    clip=1.0,
    **kw,
):
    """One round; returns (result, exact float64 sum of the survivors' inputs, unmask request)."""
    params, clients, server = _setup(ids, length, clip, **kw)
    xs = _inputs(ids, length, clip)
    advertised = [i for i in ids if i not in absent]
    keys = server.collect_public_keys({i: clients[i].advertise_keys() for i in advertised})
    sharing = [i for i in advertised if i not in drop_after_advertise]
    routed = server.route_shares({i: clients[i].share_keys(keys) for i in sharing})
    for i in sharing:
        if i not in drop_after_share:
            add_whole(server, i, clients[i].masked_input(routed[i], xs[i]))
    request = server.unmask_request()
    shares = {i: clients[i].unmask(*request) for i in request.survivors if i not in silent_in_unmask}
    result = unmasked(server, shares)
    expected = np.sum([xs[i].astype(np.float64) for i in request.survivors], axis=0)
    return result, expected, request


def _to_shares_phase(ids, length, **kw):
    """A round run up to the masked inputs; returns what the tampering tests need."""
    params, clients, server = _setup(ids, length, **kw)
    xs = _inputs(ids, length)
    keys = server.collect_public_keys({i: clients[i].advertise_keys() for i in ids})
    outgoing = {i: clients[i].share_keys(keys) for i in ids}
    routed = server.route_shares(outgoing)
    return params, clients, server, xs, routed


@pytest.mark.parametrize("n", [3, 5, 10])
@pytest.mark.parametrize("length", [1, 1000, 100_003])
def test_secure_sum_equals_plain_sum(n, length):
    ids = list(range(100, 100 + n))
    result, expected, request = _run(ids, length)
    assert request.survivors == ids and request.dropped == []
    assert result.total.dtype == np.float32 and result.total.shape == (length,)
    assert np.abs(result.total - expected).max() <= result.error_bound
    assert result.error_bound < 1e-5 * n


def test_16_bit_ring_halves_the_upload_and_sums_within_its_bound():
    ids = [0, 1, 2]
    params, clients, server = _setup(ids, 5000, clip=0.5, target_precision=0.5 * 2.0**-8)
    assert params.bits == 16 and params.ring.dtype == np.uint16
    xs = _inputs(ids, 5000, clip=0.5)
    keys = server.collect_public_keys({i: c.advertise_keys() for i, c in clients.items()})
    routed = server.route_shares({i: c.share_keys(keys) for i, c in clients.items()})
    masked = {i: clients[i].masked_input(routed[i], xs[i]) for i in ids}
    assert all(m.dtype == np.uint16 and m.nbytes < 0.51 * xs[i].nbytes for i, m in masked.items())
    for i, m in masked.items():
        add_whole(server, i, m)
    request = server.unmask_request()
    result = unmasked(server, {i: clients[i].unmask(*request) for i in ids})
    expected = np.sum([x.astype(np.float64) for x in xs.values()], axis=0)
    error = np.abs(result.total - expected).max()
    assert error <= result.error_bound <= 0.5 * 2.0**-8 * 1.01 and error > 1e-5  # coarse, as chosen, and bounded


def test_64_bit_ring_and_float64_output():
    ids = [0, 1, 2, 3]
    params, clients, server = _setup(ids, 5000, clip=0.5, target_precision=1e-12)
    assert params.bits == 64 and params.ring.dtype == np.uint64
    xs = _inputs(ids, 5000, clip=0.5)
    keys = server.collect_public_keys({i: c.advertise_keys() for i, c in clients.items()})
    routed = server.route_shares({i: c.share_keys(keys) for i, c in clients.items()})
    masked = {i: clients[i].masked_input(routed[i], xs[i]) for i in ids}
    assert all(m.dtype == np.uint64 for m in masked.values())
    for i, m in masked.items():
        add_whole(server, i, m)
    request = server.unmask_request()
    shares = {i: clients[i].unmask(*request) for i in ids}
    result = unmasked(server, shares, out_dtype=np.float64)
    expected = np.sum([x.astype(np.float64) for x in xs.values()], axis=0)
    assert result.total.dtype == np.float64
    assert np.abs(result.total - expected).max() <= result.error_bound < 1e-11


def test_chunked_masking_and_streaming_with_random_offsets():
    ids = [5, 6, 7, 8]
    length = 10_007
    params, clients, server = _setup(ids, length)
    xs = _inputs(ids, length)
    keys = server.collect_public_keys({i: c.advertise_keys() for i, c in clients.items()})
    routed = server.route_shares({i: c.share_keys(keys) for i, c in clients.items()})
    rng = np.random.default_rng(4)
    uploads = []
    for i in ids:
        clients[i].receive_shares(routed[i])
        cuts = np.concatenate([[0], np.sort(rng.choice(np.arange(1, length), 6, replace=False)), [length]])
        for a, b in zip(cuts[:-1], cuts[1:]):
            uploads.append((i, clients[i].masked_input_chunk(xs[i][a:b], int(a)), int(a)))
        uploads.append((i, clients[i].masked_check_block(), length))
    for k in rng.permutation(len(uploads)):  # chunks arrive in any order
        server.add_masked_chunk(*uploads[k])
    request = server.unmask_request()
    result = unmasked(server, {i: clients[i].unmask(*request) for i in ids})
    expected = np.sum([x.astype(np.float64) for x in xs.values()], axis=0)
    assert np.abs(result.total - expected).max() <= result.error_bound
    # server-side unmasking of a chunk at an odd offset gives the same values
    for offset, n in ((5, 13), (4093, 1000), (length - 1, 1)):
        assert np.array_equal(server.unmask_chunk(offset, n), result.total[offset : offset + n])


def test_neighbour_graph_secagg_plus():
    ids = list(range(1, 11))
    graph = harary_neighbours(ids, 4)
    assert all(len(v) == 4 for v in graph.values())
    assert all(c in graph[v] for c in ids for v in graph[c])
    params, clients, server = _setup(ids, 2000, neighbours=graph)
    assert params.threshold == 3 and not params.all_pairs
    assert SecAggParams.from_dict(params.to_dict()) == params
    keys = server.collect_public_keys({i: c.advertise_keys() for i, c in clients.items()})
    outgoing = {i: clients[i].share_keys(keys) for i in ids}
    assert all(set(outgoing[i]) == set(graph[i]) for i in ids)  # shares go to neighbours only
    result, expected, request = _run(ids, 2000, neighbours=graph, drop_after_share=[ids[0]], silent_in_unmask=[ids[1]])
    assert request.dropped == [ids[0]]
    assert np.abs(result.total - expected).max() <= result.error_bound


def test_dropouts_at_every_stage():
    ids = list(range(10))
    result, expected, request = _run(
        ids,
        3001,
        absent=[0],  # never advertised
        drop_after_advertise=[1],
        drop_after_share=[2, 3],
        silent_in_unmask=[4, 5],  # sent masked input, then vanished: still in the sum
        threshold=4,
    )
    assert request.survivors == [4, 5, 6, 7, 8, 9] and request.dropped == [2, 3]
    assert result.survivors == request.survivors
    assert np.abs(result.total - expected).max() <= result.error_bound


@pytest.mark.parametrize(
    "stage,kw",
    [
        ("advertise", {"drop_after_advertise": [3]}),
        ("share", {"drop_after_share": [3]}),
        ("masked", {"silent_in_unmask": [3]}),
        ("unmask", {"silent_in_unmask": [3, 4]}),
    ],
)
def test_single_stage_dropout_gives_exact_sum(stage, kw):
    ids = [1, 2, 3, 4, 5, 6, 7]
    result, expected, request = _run(ids, 777, **kw)
    assert np.abs(result.total - expected).max() <= result.error_bound
    if stage == "share":
        assert request.dropped == [3] and 3 not in result.survivors
    if stage in ("masked", "unmask"):
        assert 3 in result.survivors


def test_below_threshold_at_each_stage():
    ids = [1, 2, 3, 4, 5]  # default threshold 3
    with pytest.raises(ThresholdError, match="advertise_keys.*2 clients.*3") as info:
        _run(ids, 10, absent=[1, 2, 3])
    assert (info.value.stage, info.value.got, info.value.need) == ("advertise_keys", 2, 3)
    with pytest.raises(ThresholdError, match="share_keys"):
        _run(ids, 10, drop_after_advertise=[1, 2, 3])
    with pytest.raises(ThresholdError, match="masked_input"):
        _run(ids, 10, drop_after_share=[1, 2, 3])
    with pytest.raises(ThresholdError, match="unmask.*2 shares") as info:
        _run(ids, 10, silent_in_unmask=[1, 2, 3])
    assert info.value.stage == "unmask"
    # client-side: a broadcast with too few keys is refused
    params, clients, server = _setup(ids, 10)
    keys = {i: clients[i].advertise_keys() for i in (1, 2)}
    with pytest.raises(ThresholdError, match="share_keys"):
        clients[1].share_keys(keys)


def test_tampered_share_raises_naming_the_sender():
    params, clients, server, xs, routed = _to_shares_phase([1, 2, 3, 4], 50)
    bad = dict(routed[1])
    ct = bytearray(bad[3])
    ct[40] ^= 1
    bad[3] = bytes(ct)
    with pytest.raises(TamperError, match="from client 3 to client 1") as info:
        clients[1].masked_input(bad, xs[1])
    assert info.value.sender == 3


def test_relabelled_share_is_detected():
    params, clients, server, xs, routed = _to_shares_phase([1, 2, 3, 4], 50)
    swapped = dict(routed[1])
    swapped[2], swapped[3] = swapped[3], swapped[2]  # server claims 3's share came from 2
    with pytest.raises(TamperError, match="from client 2"):
        clients[1].masked_input(swapped, xs[1])
    # a share meant for client 2 delivered to client 1 fails as well
    params, clients, server, xs, routed = _to_shares_phase([1, 2, 3, 4], 50)
    misrouted = dict(routed[1])
    misrouted[3] = routed[2][3]
    with pytest.raises(TamperError, match="from client 3"):
        clients[1].masked_input(misrouted, xs[1])


def _finish(params, clients, server, xs, routed, tamper=None):
    masked = {i: clients[i].masked_input(routed[i], xs[i]) for i in clients}
    if tamper:
        tamper(masked)
    for i, m in masked.items():
        add_whole(server, i, m)
    request = server.unmask_request()
    return server, {i: clients[i].unmask(*request) for i in request.survivors}


def test_tampered_check_block_is_detected():
    def tamper(masked):
        masked[2][-3] += np.uint32(1)

    params, clients, server, xs, routed = _to_shares_phase([1, 2, 3, 4], 500)
    server, shares = _finish(params, clients, server, xs, routed, tamper)
    with pytest.raises(TamperError, match="check block.*1 of 16"):
        unmasked(server, shares)


def test_untagged_round_misses_tampering_outside_the_check_block():
    """Without a server key (no upload tags) masking alone cannot see a change outside the check block: the reason
    the product's rounds always tag their uploads (next tests)."""
    def tamper(masked):
        masked[2][10:11] += np.uint32(1 << 28)  # an array add wraps in the ring without a scalar overflow warning

    params, clients, server, xs, routed = _to_shares_phase([1, 2, 3, 4], 500)
    server, shares = _finish(params, clients, server, xs, routed, tamper)
    result = unmasked(server, shares)
    err = np.abs(result.total - np.sum([x.astype(np.float64) for x in xs.values()], axis=0))
    assert err[10] > 0.1 and np.delete(err, 10).max() <= result.error_bound


def _tagged_round(ids, length, chunk):
    """A tagged round up to the uploads: each client's masked chunks (offset -> array) and their tags."""
    params, server_key = SecAggServer.with_server_key(SecAggParams.create(ids, length, 1.0))
    clients = {i: SecAggClient(SecAggParams.from_dict(params.to_dict()), i) for i in params.client_ids}
    server = SecAggServer(params, server_key)
    xs = _inputs(ids, length)
    keys = server.collect_public_keys({i: clients[i].advertise_keys() for i in ids})
    routed = server.route_shares({i: clients[i].share_keys(keys) for i in ids})
    uploads = {}
    for i in ids:
        clients[i].receive_shares(routed[i])
        chunks = {o: clients[i].masked_input_chunk(xs[i][o:o + chunk], o) for o in range(0, length, chunk)}
        chunks[length] = clients[i].masked_check_block()
        uploads[i] = {o: (c, clients[i].upload_tag(c, o)) for o, c in chunks.items()}
    return server, clients, xs, uploads


@pytest.mark.parametrize("change", ["data", "check block", "moved", "truncated", "tag", "no tag"])
def test_tagged_upload_detects_any_change_to_a_masked_chunk(change):
    length, chunk = 1000, 300
    server, clients, xs, uploads = _tagged_round([1, 2, 3, 4], length, chunk)
    data, tag = uploads[2][300]
    if change == "data":
        data = data.copy()
        data[7] += np.uint32(1)
        offset = 300
    elif change == "check block":
        data, tag = uploads[2][length]
        data = data.copy()
        data[0] ^= np.uint32(1 << 31)
        offset = length
    elif change == "moved":  # a real chunk of client 2, presented at another offset
        offset = 600
    elif change == "truncated":
        data, offset = data[:-1], 300
    elif change == "tag":
        tag, offset = bytes([tag[0] ^ 1]) + tag[1:], 300
    else:
        tag, offset = b"", 300
    with pytest.raises(TamperError, match=f"offset {offset} of client 2") as caught:
        server.verify_tag(2, data, offset, tag)
    assert caught.value.sender == 2
    with pytest.raises(SecAggError, match="not checked with verify_tag"):
        server.add_masked_chunk(2, data, offset)  # an unchecked chunk never reaches the sum


def test_tagged_round_is_exact_and_a_chunk_of_another_client_fails_its_tag():
    length, chunk = 1000, 300
    server, clients, xs, uploads = _tagged_round([1, 2, 3, 4], length, chunk)
    data, tag = uploads[3][0]
    with pytest.raises(TamperError, match="client 2"):  # client 3's chunk relabelled as client 2's
        server.verify_tag(2, data, 0, tag)
    for i, chunks in uploads.items():
        for offset, (data, tag) in chunks.items():
            server.verify_tag(i, data, offset, tag)
        for offset, (data, _) in chunks.items():
            server.add_masked_chunk(i, data, offset)
    request = server.unmask_request()
    result = unmasked(server, {i: clients[i].unmask(*request) for i in request.survivors})
    exact = np.sum([x.astype(np.float64) for x in xs.values()], axis=0)
    assert np.abs(result.total - exact).max() <= result.error_bound


def test_server_key_must_match_the_params():
    params, key = SecAggServer.with_server_key(SecAggParams.create([0, 1, 2], 10, 1.0))
    with pytest.raises(SecAggError, match="private key of params.server_key"):
        SecAggServer(params)
    _, other = SecAggServer.with_server_key(params)
    with pytest.raises(SecAggError, match="private key of params.server_key"):
        SecAggServer(params, other)
    with pytest.raises(SecAggError, match="server_key"):
        SecAggParams.from_dict(params.to_dict() | {"server_key": "not bytes"})
    assert SecAggParams.from_dict(params.to_dict()) == params


@pytest.mark.parametrize("responders", ["exactly_t", "all"])
def test_corrupt_unmask_share_is_detected(responders):
    params, clients, server, xs, routed = _to_shares_phase([1, 2, 3, 4, 5], 300)
    masked = {i: clients[i].masked_input(routed[i], xs[i]) for i in (1, 2, 3, 4)}  # 5 drops
    for i, m in masked.items():
        add_whole(server, i, m)
    request = server.unmask_request()
    assert request.dropped == [5]
    who = request.survivors[: params.threshold] if responders == "exactly_t" else request.survivors
    shares = {i: clients[i].unmask(*request) for i in who}
    blob = bytearray(shares[who[0]][2])  # self-mask share of client 2
    blob[-1] ^= 1
    shares[who[0]][2] = bytes(blob)
    with pytest.raises(TamperError, match="check block|client 2"):
        unmasked(server, shares)


def test_corrupt_secret_key_share_is_detected():
    params, clients, server, xs, routed = _to_shares_phase([1, 2, 3, 4, 5], 300)
    for i in (1, 2, 3, 4):
        add_whole(server, i, clients[i].masked_input(routed[i], xs[i]))
    request = server.unmask_request()
    who = request.survivors[: params.threshold]
    shares = {i: clients[i].unmask(*request) for i in who}
    blob = bytearray(shares[who[1]][5])
    blob[-2] ^= 4
    shares[who[1]][5] = bytes(blob)
    with pytest.raises(TamperError, match="client 5"):
        unmasked(server, shares)


def test_masked_vector_hides_the_input():
    params, clients, server, xs, routed = _to_shares_phase([1, 2, 3], 20_000)
    x = np.linspace(-1, 1, 20_000).astype(np.float32)  # strongly structured input
    y = clients[1].masked_input(routed[1], x)
    assert y.dtype == np.uint32 and y.shape == (20_000 + 16,)
    data = y[:20_000]
    q = quantize(x, params.ring)
    assert np.mean(data == q) < 0.001
    assert abs(np.corrcoef(data.astype(np.float64), x.astype(np.float64))[0, 1]) < 0.05
    counts = np.bincount(data >> 28, minlength=16)  # top 4 bits roughly uniform
    assert counts.min() > 20_000 / 16 * 0.8 and counts.max() < 20_000 / 16 * 1.2
    assert np.mean(y[20_000:] == 0) < 0.2  # check block plaintext (zeros) is masked too


def test_client_refuses_both_share_kinds_for_one_peer():
    params, clients, server, xs, routed = _to_shares_phase([1, 2, 3, 4], 20)
    for i in (1, 2, 3, 4):
        clients[i].masked_input(routed[i], xs[i])
    with pytest.raises(RefusalError, match=r"\[4\].*both survived and dropped"):
        clients[1].unmask([1, 2, 3, 4], [4])
    first = clients[1].unmask([1, 2, 3, 4], [])
    assert set(first) == {1, 2, 3, 4} and all(v[:1] == b"B" for v in first.values())
    assert clients[1].unmask([1, 2, 3, 4], []) == first  # asking again for the same kind is fine
    with pytest.raises(RefusalError, match="both share kinds for client 4"):
        clients[1].unmask([1, 2, 3], [4])
    second = clients[2].unmask([1, 2, 3], [4])
    assert second[4][:1] == b"S"
    with pytest.raises(RefusalError, match="client 4"):
        clients[2].unmask([1, 2, 3, 4], [])


def test_bad_input_is_named():
    params, clients, server, xs, routed = _to_shares_phase([1, 2, 3], 100)
    c = clients[1]
    with pytest.raises(SecAggError, match="float32, got float64"):
        c.masked_input(routed[1], xs[1].astype(np.float64))
    with pytest.raises(SecAggError, match="length 99, expected 100"):
        c.masked_input(routed[1], xs[1][:99])
    with pytest.raises(SecAggError, match="1-D"):
        c.masked_input(routed[1], xs[1].reshape(10, 10))
    c.receive_shares(routed[1])
    c.masked_input_chunk(xs[1][:50], 0)
    with pytest.raises(SecAggError, match=r"\[40, 60\) were already masked"):
        c.masked_input_chunk(xs[1][40:60], 40)
    with pytest.raises(SecAggError, match="past the end"):
        c.masked_input_chunk(xs[1][:60], 50)
    with pytest.raises(SecAggError, match="not masked its whole input"):
        c.unmask([1, 2, 3], [])
    y2 = clients[2].masked_input(routed[2], xs[2])
    with pytest.raises(SecAggError, match="dtype uint64, expected uint32"):
        add_whole(server, 2, y2.astype(np.uint64))
    with pytest.raises(SecAggError, match="dtype float32"):
        add_whole(server, 2, y2.astype(np.float32))
    with pytest.raises(SecAggError, match=r"\[1, 117\) run past the end \(116\)"):
        server.add_masked_chunk(2, y2, 1)
    with pytest.raises(SecAggError, match="unknown client id 99"):
        add_whole(server, 99, y2)
    add_whole(server, 2, y2)
    with pytest.raises(SecAggError, match="client 2 sent elements"):
        server.add_masked_chunk(2, y2[:5], 0)
    with pytest.raises(SecAggError, match="unknown client id 42"):
        clients[2].unmask([1, 2, 3, 42], [])
    with pytest.raises(SecAggError, match="unknown client id 7"):
        SecAggClient(params, 7)


def test_server_rejects_bad_keys_and_routes():
    params, clients, server = _setup([1, 2, 3], 10)
    keys = {i: c.advertise_keys() for i, c in clients.items()}
    with pytest.raises(SecAggError, match="unknown client id 9"):
        server.collect_public_keys({**keys, 9: keys[1]})
    with pytest.raises(SecAggError, match="32 bytes"):
        server.collect_public_keys({**keys, 3: (b"x", keys[3][1])})
    with pytest.raises(SecAggError, match="reuses a public key of client 1"):
        server.collect_public_keys({**keys, 3: keys[1]})
    broadcast = server.collect_public_keys(keys)
    with pytest.raises(SecAggError, match="not the ones it advertised"):
        clients[1].share_keys({**broadcast, 1: (broadcast[1][1], broadcast[1][0])})
    outgoing = {i: c.share_keys(broadcast) for i, c in clients.items()}
    with pytest.raises(SecAggError, match=r"client 1 sent shares to \[2\], expected \[2, 3\]"):
        server.route_shares({**outgoing, 1: {2: outgoing[1][2]}})
    with pytest.raises(SecAggError, match="stage"):
        server.unmask_request()  # out of order


def test_partial_streamed_upload_is_reported():
    params, clients, server, xs, routed = _to_shares_phase([1, 2, 3, 4], 100)
    for i in (1, 2, 3):
        add_whole(server, i, clients[i].masked_input(routed[i], xs[i]))
    clients[4].receive_shares(routed[4])
    server.add_masked_chunk(4, clients[4].masked_input_chunk(xs[4][:30], 0), 0)
    with pytest.raises(SecAggError, match=r"clients \[4\] arrived only in part.*\[30, 116\)"):
        server.unmask_request()


def test_params_round_trip_and_validation():
    params = SecAggParams.create([9, 3, 5, 7], 1234, 0.25, threshold=3, check_size=8)
    d = params.to_dict()
    allowed = (bytes, int, float, bool, list)
    assert all(isinstance(v, allowed) for v in d.values())
    assert all(isinstance(x, int) for v in d.values() if isinstance(v, list) for x in v)
    assert SecAggParams.from_dict(d) == params
    assert params.client_ids == (3, 5, 7, 9) and params.ring_length == 1242
    missing = dict(d)
    del missing["threshold"]
    with pytest.raises(SecAggError, match="'threshold'"):
        SecAggParams.from_dict(missing)
    with pytest.raises(SecAggError, match="threshold"):
        SecAggParams.create([1, 2, 3], 10, 1.0, threshold=4)
    with pytest.raises(SecAggError, match="at least 2 clients"):
        SecAggParams.create([1], 10, 1.0)
    with pytest.raises(SecAggError, match="symmetric"):
        SecAggParams.create([1, 2, 3], 10, 1.0, neighbours={1: [2, 3], 2: [1], 3: [2]}, threshold=2)


def test_params_fit_a_flower_config_record():
    flwr_common = pytest.importorskip("flwr.common")
    for neighbours in (None, 2):
        params = SecAggParams.create([11, 12, 13, 14, 15, 16], 100, 1.0, neighbours=neighbours)
        record = flwr_common.ConfigRecord(params.to_dict())
        assert SecAggParams.from_dict(dict(record)) == params
