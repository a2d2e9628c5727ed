"""feddem installs under one import root: the wheel holds `feddem` and nothing else at the top level, every package
folder of the repository is in it, and files named like the old top-level packages in the working directory change
nothing."""

import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = {"common": "feddem.common", "client": "feddem.client", "server": "feddem.server",
                  "protos/feddem": "feddem"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    source = build / "source"  # a copy, so setuptools' build/ folder never lands in the repository
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "runs",
                                                                "__pycache__", ".whl", ".gl"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(source)], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "TMPDIR": str(build), "HOME": str(build)})
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("feddem-*.whl")
    return path


def test_the_wheel_installs_only_the_feddem_import_root(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"feddem"}, top
    packages = {str(Path(n).parent).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    # every package folder of the repository is shipped under its feddem.* name
    for folder, package in SOURCE_FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            expected = ".".join([package, *rel.parts])
            assert expected in packages, f"{init.parent} is not in the wheel as {expected}"
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "feddem = feddem.server.cli:main" in entry_points
    assert "feddem-admin = feddem.server.admin_cli:main" in entry_points


def test_stray_modules_named_like_the_folders_change_nothing(tmp_path):
    """A `common.py`, `client.py` or `server.py` in the working directory broke `import client.app` before."""
    for name in ("common", "client", "server"):
        (tmp_path / f"{name}.py").write_text("raise RuntimeError('the stray module was imported')\n")
    code = textwrap.dedent("""
        import feddem.client.app, feddem.server.app, feddem.common.config
        from feddem.admin.v1 import admin_pb2
        print(feddem.client.app.app.__class__.__name__, feddem.server.app.app.__class__.__name__)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ClientApp", "ServerApp"]


def test_flower_components_name_the_import_root():
    import tomllib

    components = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "feddem.server.app:app", "clientapp": "feddem.client.app:app"}
    assert not (ROOT / "feddem").exists(), "a feddem/ folder at the app root would shadow the package in a FAB"
