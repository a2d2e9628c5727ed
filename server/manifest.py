"""The run folder's manifest: every output file a run writes, named once here, with the store kind it is recorded
under. The run loop (`server.workflow`) adds each output as it writes it and returns the manifest in its
`RunResult`; the report, the export and the recorder (`server.admin.recorder`) take their file names from it, so
no module spells an output's name but this one. `Manifest.of_folder` rebuilds one from a folder written without
it (a run recorded later, the admin server's remerge)."""

from dataclasses import dataclass, field
from pathlib import Path

MODEL = "model"  # the merged model's folder (Hugging Face layout, with its card)
AGGREGATE = "aggregate.safetensors"  # the merge's vector (the sum of the rounds' aggregates)
REPORT_JSON, REPORT_PNG = "report.json", "report.png"
ABLATION_JSON, ABLATION_PNG = "ablation.json", "ablation.png"
POOL_DIR = "pool"  # a trusted run's per-site vectors (`--keep-pool`): one safetensors vector per site
RUN_ENTRIES = frozenset({MODEL, POOL_DIR, REPORT_JSON, REPORT_PNG, AGGREGATE, ABLATION_JSON, ABLATION_PNG})

# store kinds: what the recorder records each output as ("" = not recorded)
KIND_MODEL, KIND_AGGREGATE, KIND_REPORT, KIND_SITE_VECTOR = "model", "aggregate", "report", "site-vector"


@dataclass(frozen=True)
class Output:
    """One output file: its path in the run folder (POSIX, relative) and the store kind it is recorded as."""

    path: str
    kind: str = ""


@dataclass
class Manifest:
    """The outputs of one run folder, in the order they were written."""

    out_dir: Path
    outputs: list[Output] = field(default_factory=list)

    def path(self, name: str) -> Path:
        """Where output `name` (one of this module's names) lives in the run folder."""
        return self.out_dir / name

    def add(self, name: str, kind: str = "") -> Path:
        """Record that output `name` was written; returns its path."""
        self.outputs = [o for o in self.outputs if o.path != name] + [Output(name, kind)]
        return self.path(name)

    def add_folder(self, name: str, kind: str, pattern: str = "*") -> None:
        """Record every file directly in folder `name` that matches `pattern` (a folder a library wrote: the
        exported model, the pool)."""
        folder = self.path(name)
        if folder.is_dir():
            for p in sorted(folder.glob(pattern)):
                if p.is_file():
                    self.add(f"{name}/{p.name}", kind)

    def files(self) -> list[Path]:
        """Every output's path."""
        return [self.path(o.path) for o in self.outputs]

    def recorded(self, kind: str | None = None) -> list[Output]:
        """The outputs the store records (of `kind`, when given)."""
        return [o for o in self.outputs if o.kind and (kind is None or o.kind == kind)]

    @classmethod
    def of_folder(cls, out_dir: Path) -> "Manifest":
        """The manifest of a folder a run (or a remerge) wrote without one: the outputs of this module's names that
        are there."""
        manifest = cls(Path(out_dir))
        manifest.add_folder(POOL_DIR, KIND_SITE_VECTOR, "*.safetensors")
        for name, kind in ((AGGREGATE, KIND_AGGREGATE), (REPORT_JSON, KIND_REPORT), (REPORT_PNG, KIND_REPORT),
                           (ABLATION_JSON, KIND_REPORT), (ABLATION_PNG, "")):
            if manifest.path(name).is_file():
                manifest.add(name, kind)
        manifest.add_folder(MODEL, KIND_MODEL)
        return manifest
