"""The site's privacy guard: checks a site runs before its vector enters a secure aggregation.

In the secure threat model the server is the adversary, so the site itself refuses to contribute when
- the aggregation has fewer than `min_peers` OTHER sites, or fewer than `min_peers` other sites with a nonzero weight
  (a sum over few sites says much about each; every site sees all the weights, bound into the round's session, so
  the server cannot tell each site a different story);
- its weight lies outside [weight_min, weight_max];
- this vector was already aggregated once in this run: two sums whose weights differ in one site reveal that
  site's vector (differencing). The fact is persisted on the site's disk next to the vector
  (`<work-dir>/runs/<run-id>/aggregations.json`), so a restarted site (or a fresh actor) cannot be talked round.
  The one exception: a run that declares distributed noise (`noise` > 0) may aggregate the same vector up to
  `aggregation-budget` times; every site then adds its part of the noise itself, so each sum is noisy.

The policy is the stricter of the site's own node config (`min-peers`, `weight-min`, `weight-max`,
`aggregation-budget` and `noise`, when set) and the run config the server sent, and it is fixed at the first stage of a round: a later message cannot loosen it.
A refusal raises `GuardRefusal` (a FeddemError), which the ClientApp returns as the `failure` record and logs.
"""

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from feddem.client.site_context import SiteContext, vector_file
from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError
from feddem.common.stored_tensors import stored_digest

log = logging.getLogger("feddem.site")

RECORD_NAME = "aggregations.json"


class GuardRefusal(FeddemError):
    """The site's privacy guard refuses to contribute; the message says which rule and why."""

    def __init__(self, site: str, reason: str):
        super().__init__(f"privacy guard of {site} refuses: {reason}")


@dataclass(frozen=True)
class GuardPolicy:
    min_peers: int
    weight_min: float
    weight_max: float
    budget: int = 1  # aggregations of the same vector allowed in one run
    noise: float = 0.0  # standard deviation of the noise in the sum; this site adds noise / sqrt(n)

    @classmethod
    def for_site(cls, cfg: RunConfig, node_config: dict) -> "GuardPolicy":
        """The stricter of the run config and the site's own node config; at least one other site, always; a
        budget above 1 only with noise."""
        own = {k: node_config[k] for k in ("min-peers", "weight-min", "weight-max", "aggregation-budget", "noise")
               if k in node_config}
        noise = max(cfg.noise, float(own.get("noise", 0.0)))
        budget = min(cfg.aggregation_budget, int(own.get("aggregation-budget", cfg.aggregation_budget)))
        return cls(
            min_peers=max(1, cfg.min_peers, int(own.get("min-peers", 1))),
            weight_min=max(cfg.weight_min, float(own.get("weight-min", cfg.weight_min))),
            weight_max=min(cfg.weight_max, float(own.get("weight-max", cfg.weight_max))),
            budget=max(1, budget) if noise > 0 else 1,
            noise=noise,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def record_path(site: SiteContext, run_id: int) -> Path:
    return site.vector_path(run_id).parent / RECORD_NAME


def vector_digest(site: SiteContext, run_id: int) -> str:
    """The content digest of the stored vector (from its header): what "the same vector" means."""
    return stored_digest(vector_file(site, run_id))


def read_record(site: SiteContext, run_id: int) -> list[dict]:
    path = record_path(site, run_id)
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text())["aggregations"])
    except (ValueError, KeyError, TypeError):
        # a damaged record must not reopen the door: treat it as "already aggregated"
        return [{"digest": "*", "session": "unknown", "note": f"{path} is unreadable"}]


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
    if not policy.weight_min <= weight <= policy.weight_max:  # also false for NaN
        raise GuardRefusal(site.name, f"weight {weight!r} is outside the allowed range "
                                      f"[{policy.weight_min}, {policy.weight_max}]")


def check_not_aggregated(site: SiteContext, run_id: int, digest: str, budget: int = 1) -> None:
    """Refuse when this vector has used up its budget of aggregations in this run (an unreadable record counts as
    a spent budget)."""
    spent = [e for e in read_record(site, run_id) if e.get("digest") in (digest, "*")]
    if any(e.get("digest") == "*" for e in spent) or len(spent) >= budget:
        last = spent[-1]
        times = "once" if len(spent) == 1 else f"{len(spent)} times"
        raise GuardRefusal(site.name, f"its vector of run {run_id} was already aggregated {times} (last: session "
                                      f"{last.get('session')}, weight {last.get('weight')}; budget {budget}); "
                                      f"another sum with other weights would reveal it by differencing")


def mark_aggregated(site: SiteContext, run_id: int, digest: str, session: bytes, weight: float,
                    noise: float = 0.0) -> None:
    """Persist, before the masked vector leaves the site, that this vector is spent once (atomic write + fsync)."""
    entries = read_record(site, run_id)
    entries.append({"digest": digest, "session": session.hex(), "weight": weight, "noise": noise,
                    "time": time.time()})
    path = record_path(site, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=RECORD_NAME, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"aggregations": entries}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("%s: vector of run %d marked as aggregated (session %s)", site.name, run_id, session.hex()[:12])
