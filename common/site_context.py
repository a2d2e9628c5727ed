"""Who a site is and where it keeps its files: its identity from the node config, and its stored vector.

Light on purpose (no transformers, no datasets): the secure-aggregation stages and the privacy guard need only
this, and in a deployment every message starts a fresh `flwr-clientapp` process that imports what its handler needs.
"""

from dataclasses import dataclass
from pathlib import Path

from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError
from feddem.common.paths import feddem_home


STATS_NAME = "merge-stats.safetensors"  # a site's merge-rule statistics, beside its vector of a run
BASE_EVAL_NAME = "base-eval.json"  # the base's evaluation in a run, beside its vector (done once per run)
BESIDE_VECTOR = (STATS_NAME, BASE_EVAL_NAME)  # what a run's folder holds besides the vector, derived from it


@dataclass
class SiteContext:
    """Who the site is, where it keeps its files, and what its own node config says about its data and device.

    Simulated sites get `partition-id` (their shard of the run's `data` spec). A deployed site's SuperNode gets
    `--node-config` with `data-path` (its own data: a folder with `train.*` and `test.*` files, a folder holding one
    data file, or that file; `synthetic:NAME` only when a built-in domain is wanted on purpose), and optionally
    `site-name`, `domain` (the name its data goes by in the report), `device` (overrides the run's), `work-dir`,
    and the privacy guard's settings (`min-peers`, `weight-min`, `weight-max`, `aggregation-budget`, `noise`,
    `data-budget`, `allow-plain-upload`: `client.guard`) and `keep-runs` (`client.retention`). The guard's record and
    the site's identity live in `work_dir` (`client.ledger`)."""

    index: int  # which shard of the data spec (partition-id); 0 for a deployed site
    name: str
    work_dir: Path
    data_path: str | None = None  # node config `data-path`: the site's own data (deployment)
    device: str | None = None  # node config `device`: this site's device, whatever the run config says
    domain: str | None = None  # node config `domain`: the name of the site's data in the report

    @classmethod
    def from_node_config(cls, node_config: dict) -> "SiteContext":
        data_path = node_config.get("data-path")
        if "partition-id" not in node_config and data_path is None:
            raise FeddemError("this node's node config has no 'data-path' (a deployed site's own data folder, e.g. "
                              "--node-config 'data-path=\"/data/site\"') and no 'partition-id' (a simulated site's "
                              "shard of the run's data): cannot tell which data is its own")
        index = int(node_config.get("partition-id", 0))
        default_name = f"site-{index}" if "partition-id" in node_config else f"site-{Path(str(data_path)).name}"
        name = str(node_config.get("site-name") or default_name)
        work_dir = Path(str(node_config.get("work-dir") or feddem_home() / "sites" / name)).expanduser()
        optional = {k: str(node_config[k]) for k in ("device", "domain") if node_config.get(k)}
        return cls(index, name, work_dir, None if data_path is None else str(data_path), **optional)

    def resolve_device(self, cfg: RunConfig):
        """The torch device: the site's own `device` when its node config sets one, else the run's."""
        from feddem.common.devices import resolve_device

        return resolve_device(self.device or cfg.device)

    def vector_path(self, run_id: int) -> Path:
        return self.work_dir / "runs" / str(run_id) / "vector.safetensors"

    def stats_path(self, run_id: int) -> Path:
        """The merge rule's statistics beside the run's vector (`client.merge_parts`)."""
        return self.vector_path(run_id).with_name(STATS_NAME)


def vector_file(site: SiteContext, run_id: int) -> Path:
    """The path of the site's stored vector of this run; an error when it has none."""
    path = site.vector_path(run_id)
    if not path.is_file():
        raise FeddemError(f"{site.name} holds no vector for run {run_id}: it has not fine-tuned in this run")
    return path


def stored_vector(site: SiteContext, run_id: int):
    """The site's stored vector of this run as a lazy torch vector (`common.vector_io.load_vector`)."""
    from feddem.common.vector_io import load_vector  # torch: not for the secure stages, which read it with numpy

    return load_vector(vector_file(site, run_id))
