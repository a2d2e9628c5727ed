"""The package's layering as a contract, read statically from the source (every import, function-level ones too):
`feddem.common` imports neither `feddem.client` nor `feddem.server`, and `feddem.server` does not import
`feddem.client`. Also: no module configures logging when it is imported (the entry points do: `common.logsetup`).
bench/ and tests/ are outside the contract."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "client", "server")
FORBIDDEN = {  # importer layer -> layers it must not import
    "feddem.common": ("feddem.client", "feddem.server"),
    "feddem.server": ("feddem.client",),
}

# No exceptions: the simulation loads the ClientApp by its component reference (as Flower's engine does, checked
# below against pyproject.toml), and a site operator's commands are `feddem-site`'s (client/cli.py). An entry added
# here must name why; one that no longer occurs fails the test, so the list cannot go stale.
ALLOWED: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(("feddem",) + parts)] = path
    return found


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """Every module `module` imports (absolute name, line), wherever the import statement is."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from feddem.client import site` imports feddem.client.site; `from feddem.client.site import f`,
            # feddem.client.site (`_violations` trims a name to the module that holds it)
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _layer(name: str) -> str | None:
    return next((layer for layer in ("feddem.common", "feddem.client", "feddem.server")
                 if name == layer or name.startswith(layer + ".")), None)


def _violations() -> dict[tuple[str, str], str]:
    modules = _modules()
    found = {}
    for module, path in modules.items():
        banned = FORBIDDEN.get(_layer(module), ())
        for target, line in _imports(module, path):
            layer = _layer(target)
            if layer in banned:
                while target not in modules and "." in target:  # `from pkg import name`: name is not a module
                    target = target.rsplit(".", 1)[0]
                found.setdefault((module, target), f"{path.relative_to(ROOT)}:{line}: {module} imports {target}")
    return found


def test_the_scan_sees_every_kind_of_import(tmp_path):
    """The scanner itself: absolute, relative and function-level imports are all seen."""
    source = ("import feddem.client.site\nfrom ..client import guard\n"
              "def f():\n    from feddem.server.base import x\n    from . import sibling\n")
    path = tmp_path / "mod.py"
    path.write_text(source)
    names = {name for name, _ in _imports("feddem.common.mod", path)}
    assert names == {"feddem.client.site", "feddem.client.guard", "feddem.server.base.x", "feddem.common.sibling"}
    assert _layer("feddem.clientele") is None and _layer("feddem.client") == "feddem.client"


def test_layers_import_only_downwards():
    violations = _violations()
    new = [text for key, text in sorted(violations.items()) if key not in ALLOWED]
    assert not new, "layering violations (common must not import client/server; server must not import client):\n" \
        + "\n".join(new)
    gone = sorted(ALLOWED - set(violations))
    assert not gone, f"allowed imports that no longer occur; remove them from ALLOWED: {gone}"


def _import_time_calls(tree: ast.Module):
    """The calls a module makes when it is imported: not those inside functions (their decorators do run), nor in
    the `if __name__ == "__main__":` block."""
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            pending += node.decorator_list
            continue
        if isinstance(node, ast.Lambda) or (isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)):
            continue
        if isinstance(node, ast.Call):
            yield node
        pending += ast.iter_child_nodes(node)


def _configures_logging(source: str) -> list[int]:
    return [call.lineno for call in _import_time_calls(ast.parse(source))
            if ast.unparse(call.func).endswith("basicConfig")]


def test_the_logging_scan_tells_import_time_from_run_time():
    assert _configures_logging("import logging\nlogging.basicConfig(level=10)\n") == [2]
    assert _configures_logging("import logging\nif True:\n    logging.basicConfig()\n") == [3]
    assert _configures_logging("import logging\nclass A:\n    x = logging.basicConfig()\n") == [3]
    assert _configures_logging("import logging\ndef main():\n    logging.basicConfig()\n"
                               "if __name__ == '__main__':\n    logging.basicConfig()\n") == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_logging_configuration_at_import_time(package):
    offenders = [f"{path.relative_to(ROOT)}:{line}" for module, path in _modules().items()
                 if _layer(module) == f"feddem.{package}" for line in _configures_logging(path.read_text())]
    assert not offenders, f"logging.basicConfig at import time: {offenders}"


def test_the_simulation_loads_the_client_app_that_flwr_run_loads():
    import tomllib

    from feddem.server.simulation import CLIENT_APP

    components = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert CLIENT_APP == components["clientapp"]
