"""The site's privacy guard: checks a site runs before any form of its vector leaves it.

In the secure threat model the server is the adversary (docs/threat-model.md), so the site itself refuses to
contribute when
- the aggregation has fewer than `min_peers` OTHER sites, or fewer than `min_peers` other sites with a nonzero weight
  (a sum over few sites says much about each; every site sees all the weights, bound into the round's session, so
  the server cannot tell each site a different story);
- its weight lies outside [weight_min, weight_max];
- this vector was already aggregated, in this run or any other: two sums whose weights differ in one site reveal
  that site's vector (differencing), and training is deterministic, so a new run can recreate the same vector. The
  one exception: a run that declares distributed noise (`noise` > 0) may aggregate the same vector up to
  `aggregation-budget` times in all; every site then adds its part of the noise itself, so each sum is noisy;
- its data is already in `data-budget` secure sums (any runs, any rounds): vectors trained on the same data with
  other randomness are close, not equal, so their sums in two runs give an approximation of the vector by
  differencing. A deployed site allows one such sum unless its node config says more; a simulated one no limit;
- the request is a plain (in the clear) upload and the site's node config does not allow that
  (`allow-plain-upload`; default: never at a deployed site, what the run declares at a simulated one), or the run
  declared secure aggregation when the vector was trained (the site is committed to it for that vector).

The facts live in the site-wide record (`client.ledger`: `<work-dir>/guard-record.json` beside `site.json`), keyed
on the vector's content digest and the digest of the data it came from, persisted before anything leaves, so a
restarted site (or a fresh actor) cannot be talked round, and a lost record fails closed. A site trains a vector
whose (data, seed) pair was already spent with fresh randomness (`training_seed`): re-running a run gives a new
vector rather than an identical one, and the data budget above bounds what the close ones reveal.

The policy is the stricter of the site's own node config (`min-peers`, `weight-min`, `weight-max`,
`aggregation-budget`, `noise`, `data-budget`, `allow-plain-upload`, when set) and the run config the server sent, and
it is fixed at the first stage of a round: a later message cannot loosen it. A refusal raises `GuardRefusal` (a
FeddemError), which the ClientApp returns as the `failure` record and logs.
"""

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from feddem.client import ledger
from feddem.client.ledger import RECORD_NAME, SPENT, UNKNOWN_DATA, RecordError, record_path  # noqa: F401
from feddem.common.site_context import SiteContext, vector_file
from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError
from feddem.common.digests import stored_digest
from feddem.common.weighting.weights import in_range

log = logging.getLogger("feddem.site")

DEPLOYED_DATA_BUDGET = 1  # secure sums a deployed site's data may be in, across runs, unless its node config says


class GuardRefusal(FeddemError):
    """The site's privacy guard refuses to contribute; the message says which rule and why."""

    def __init__(self, site: str, reason: str):
        super().__init__(f"privacy guard of {site} refuses: {reason}")


def _flag(value, key: str) -> bool:
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise FeddemError(f"node config {key}={value!r}: expected true or false")


def simulated(node_config: dict) -> bool:
    """A virtual site of `feddem simulate` (its operator runs the server too) rather than a deployed SuperNode."""
    return "partition-id" in node_config


@dataclass(frozen=True)
class GuardPolicy:
    min_peers: int
    weight_min: float
    weight_max: float
    budget: int = 1  # aggregations of the same vector allowed, across runs
    noise: float = 0.0  # standard deviation of the noise in the sum; this site adds noise / sqrt(n)
    data_budget: int = 0  # secure sums the site's data may be in, across runs (0: no limit)
    allow_plain: bool = False  # whether this site ever sends a vector in the clear

    @classmethod
    def for_site(cls, cfg: RunConfig, node_config: dict) -> "GuardPolicy":
        """The stricter of the run config and the site's own node config; at least one other site, always; a
        budget above 1 only with noise."""
        own = {k: node_config[k] for k in ("min-peers", "weight-min", "weight-max", "aggregation-budget", "noise",
                                           "data-budget", "allow-plain-upload") if k in node_config}
        noise = max(cfg.noise, float(own.get("noise", 0.0)))
        budget = min(cfg.aggregation_budget, int(own.get("aggregation-budget", cfg.aggregation_budget)))
        sim = simulated(node_config)
        data_budget = int(own.get("data-budget", 0 if sim else DEPLOYED_DATA_BUDGET))
        if data_budget < 0:
            raise FeddemError(f"node config data-budget={data_budget}: expected 0 (no limit) or more")
        if "allow-plain-upload" in own:
            allow_plain = _flag(own["allow-plain-upload"], "allow-plain-upload")
        else:  # a deployed site never, unless its operator says so; a simulated one does what the run declares
            allow_plain = sim and cfg.aggregation == "plain"
        return cls(
            min_peers=max(1, cfg.min_peers, int(own.get("min-peers", 1))),
            weight_min=max(cfg.weight_min, float(own.get("weight-min", cfg.weight_min))),
            weight_max=min(cfg.weight_max, float(own.get("weight-max", cfg.weight_max))),
            budget=max(1, budget) if noise > 0 else 1,
            noise=noise,
            data_budget=data_budget,
            allow_plain=allow_plain,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def vector_digest(site: SiteContext, run_id: int) -> str:
    """The content digest of the stored vector (from its header): what "the same vector" means."""
    return stored_digest(vector_file(site, run_id))


def data_digest(texts: Iterable[str]) -> str:
    """What "the same data" means: a digest of the training texts, in order (it never leaves the site)."""
    h = hashlib.sha256(b"feddem-data-v1")
    for text in texts:
        raw = str(text).encode("utf-8")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


def _entries(site: SiteContext) -> list[dict]:
    try:
        return ledger.entries(site)
    except RecordError as exc:
        raise GuardRefusal(site.name, str(exc)) from None


def _update(site: SiteContext, build) -> list[dict]:
    try:
        return ledger.update(site, build)
    except RecordError as exc:
        raise GuardRefusal(site.name, str(exc)) from None


def _trained(entries: list[dict], digest: str) -> dict | None:
    """The latest `trained` entry of this vector (None for a vector this guard did not see trained)."""
    return next((e for e in reversed(entries) if e.get("event") == "trained" and e.get("digest") == digest), None)


def training_seed(site: SiteContext, cfg: RunConfig, run_id: int, data: str) -> tuple[int, int, bool]:
    """(seed, seed base, fresh): the run's seed for this site (`seed + partition`), unless a vector trained from the
    same data with that seed was already spent; then fresh randomness from the site's secret, so a new run never
    recreates a spent vector (a first run stays reproducible)."""
    base = cfg.seed + site.index
    entries = _entries(site)
    # spent vectors of this data and seed (or of unknown data or seed: adopted ones), whatever their run
    used = [e for e in entries if e.get("event") in SPENT and e.get("data") in (data, UNKNOWN_DATA)
            and e.get("seed-base", base) == base]
    if not used:
        return base, base, False
    trained = sum(1 for e in entries if e.get("event") == "trained")
    mix = hashlib.sha256(ledger.secret(site) + f"|{run_id}|{data}|{base}|{trained}".encode()).digest()
    log.info("%s: a vector trained on this data with seed %d was already aggregated: training with fresh "
             "randomness (the site's secret)", site.name, base)
    return int.from_bytes(mix[:8], "little") >> 2, base, True


def record_trained(site: SiteContext, run_id: int, cfg: RunConfig, data: str, seed_base: int, fresh: bool) -> None:
    """Persist that the run's vector was trained: its digest, its data, and the aggregation mode the run declared
    (the vector is committed to it: a vector trained in a secure run is never sent in the clear)."""
    entry = {"event": "trained", "run": run_id, "digest": vector_digest(site, run_id), "data": data,
             "mode": cfg.aggregation, "seed-base": seed_base, "fresh-seed": fresh}
    _update(site, lambda old: [entry])


def check_plain_mode(site: SiteContext, cfg: RunConfig, policy: GuardPolicy) -> None:
    """Before training: a run that declares plain aggregation at a site that never sends in the clear is refused
    at once (not after the training)."""
    if cfg.aggregation != "secure" and not policy.allow_plain:
        raise GuardRefusal(site.name, "the run declares plain aggregation (vectors in the clear) and this site's "
                                      "node config does not allow it (allow-plain-upload)")


def check_peers(policy: GuardPolicy, site: SiteContext, others: int, stage: str) -> None:
    if others < policy.min_peers:
        raise GuardRefusal(site.name, f"only {others} other site(s) in the aggregation at stage '{stage}', "
                                      f"min-peers is {policy.min_peers}")


def check_other_weights(policy: GuardPolicy, site: SiteContext, others: list[float]) -> None:
    """At least `min_peers` other sites must really be in the sum: with weight 0 a site adds nothing, and a sum of
    one nonzero term is that site's vector."""
    nonzero = sum(1 for w in others if w != 0)
    if nonzero < policy.min_peers:
        raise GuardRefusal(site.name, f"only {nonzero} other site(s) have a nonzero weight in the aggregation, "
                                      f"min-peers is {policy.min_peers}")


def check_weight(policy: GuardPolicy, site: SiteContext, weight: float) -> None:
    if not in_range(weight, policy.weight_min, policy.weight_max):  # also false for nan and inf
        raise GuardRefusal(site.name, f"weight {weight!r} is outside the allowed range "
                                      f"[{policy.weight_min}, {policy.weight_max}]")


def _spent_reason(entries: list[dict], run_id: int, digest: str, policy: GuardPolicy) -> str | None:
    """Why this vector may not leave the site again (None when it may)."""
    spent = [e for e in entries if e.get("event") in SPENT]
    same = [e for e in spent if e.get("digest") == digest]
    if len(same) >= policy.budget:
        last = same[-1]
        times = "once" if len(same) == 1 else f"{len(same)} times"
        how = "sent in the clear" if last.get("event") == "uploaded" else f"session {last.get('session')}"
        return (f"its vector of run {run_id} was already aggregated {times} (last: run {last.get('run')}, {how}, "
                f"weight {last.get('weight')}; budget {policy.budget}); another sum with other weights would reveal "
                f"it by differencing")
    if policy.data_budget:
        trained = _trained(entries, digest)
        data = trained.get("data") if trained else None
        # a vector of unknown data counts every sum; every sum of unknown data counts for every vector
        on_data = [e for e in spent if data is None or e.get("data") in (data, UNKNOWN_DATA)]
        if len(on_data) >= policy.data_budget:
            return (f"its data is already in {len(on_data)} secure sum(s) across runs and data-budget is "
                    f"{policy.data_budget}: vectors trained on the same data are close, so sums in two runs would "
                    f"reveal an approximation of its vector by differencing (raise data-budget in the site's node "
                    f"config knowingly, or declare --noise)")
    return None


def check_not_aggregated(site: SiteContext, run_id: int, digest: str, policy: GuardPolicy) -> None:
    """Refuse when this vector (across all runs) or its data has used up its budget of aggregations."""
    reason = _spent_reason(_entries(site), run_id, digest, policy)
    if reason:
        raise GuardRefusal(site.name, reason)


def _spend(site: SiteContext, run_id: int, digest: str, policy: GuardPolicy, entry: dict) -> None:
    """Check the budgets again under the record's lock and persist the spending, with the vector's data digest."""
    def build(entries):
        reason = _spent_reason(entries, run_id, digest, policy)
        if reason:
            raise GuardRefusal(site.name, reason)
        trained = _trained(entries, digest) or {}
        known = {"seed-base": trained["seed-base"]} if "seed-base" in trained else {}
        return [{"run": run_id, "digest": digest, "data": trained.get("data", UNKNOWN_DATA)} | known | entry]

    _update(site, build)


def mark_aggregated(site: SiteContext, run_id: int, digest: str, session: bytes, weight: float,
                    policy: GuardPolicy) -> None:
    """Persist, before the masked vector leaves the site, that this vector is spent once."""
    _spend(site, run_id, digest, policy, {"event": "aggregated", "session": session.hex(), "weight": weight,
                                          "noise": policy.noise, "mode": "secure"})
    log.info("%s: vector of run %d marked as aggregated (session %s)", site.name, run_id, session.hex()[:12])


def check_plain_upload(site: SiteContext, cfg: RunConfig, policy: GuardPolicy, run_id: int, digest: str,
                       weight: float) -> None:
    """A plain upload (the vector in the clear) goes out only when this site allows plain aggregation, the run
    declared plain when this vector was trained (and still does), the weight is in range, and the vector has
    never left the site before (in a secure sum or in the clear); the upload is then recorded."""
    if cfg.aggregation == "secure":
        raise GuardRefusal(site.name, "a plain upload was asked for, but the run declares secure aggregation: this "
                                      "site's vectors never go in the clear in it")
    if not policy.allow_plain:
        raise GuardRefusal(site.name, "this site never sends its vector in the clear (node config "
                                      "allow-plain-upload is false or, at a deployed site, unset)")
    entries = _entries(site)
    modes = {e.get("mode") for e in entries if e.get("event") == "trained" and e.get("digest") == digest}
    if modes != {"plain"}:  # a vector (re)trained in a run that declared secure aggregation is committed to it
        declared = " and ".join(sorted(map(str, modes))) + " aggregation" if modes else \
            "no aggregation this site recorded"
        raise GuardRefusal(site.name, f"its vector of run {run_id} was trained under {declared}: it is committed to "
                                      f"that and is never sent in the clear")
    data = (_trained(entries, digest) or {}).get("data")
    if any(e.get("event") == "aggregated" and e.get("data") in (data, UNKNOWN_DATA) for e in entries):
        raise GuardRefusal(site.name, "its data is already in a secure sum: a vector of the same data in the clear "
                                      "would approximate the one in that sum")
    check_weight(policy, site, weight)
    _spend(site, run_id, digest, GuardPolicy(policy.min_peers, policy.weight_min, policy.weight_max),
           {"event": "uploaded", "weight": weight, "noise": 0.0, "mode": "plain"})
    log.info("%s: vector of run %d sent in the clear (plain aggregation, weight %.4f)", site.name, run_id, weight)


def read_record(site: SiteContext, run_id: int) -> list[dict]:
    """The secure aggregations of this run's vectors, from the site-wide record."""
    return [e for e in _entries(site) if e.get("event") == "aggregated" and e.get("run") == run_id]
