"""The house plan, checked: which package may import which.

An actor kind's package imports only the shared layers, the bus and itself;
the shared layers and the bus import no actor kind; the supervisor reaches
actor kinds only through the registry (by name, not by import). Every
package folder is installed under the meshsup namespace.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = frozenset({"coord", "crypto", "dns", "magicsock", "netlog", "relay", "router", "tunio"})
SHARED = frozenset({"bus", "kernel", "wire", "routing", "flowcount", "filter", "settings", "base", "log", "registry"})


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """Every module a file imports, as an absolute dotted name."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(("meshsup",) + path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found += [(node.lineno, f"{base}.{a.name}" if not node.module else base) for a in node.names]
    return found


def layer(module: str) -> str | None:
    """The layer a meshsup module belongs to: 'kind:NAME', 'shared', 'supervisor', 'bpf'."""
    parts = module.split(".")
    if parts[0] != "meshsup" or len(parts) < 2:
        return None
    if parts[1] == "actors":
        if len(parts) < 3:
            return "shared"
        return f"kind:{parts[2]}" if parts[2] in KINDS else "shared"
    return parts[1]


def crossings(root: Path = ROOT) -> list[str]:
    bad = []
    for top in ("actors", "supervisor", "bpf"):
        for path in sorted((root / top).rglob("*.py")):
            own = layer(".".join(("meshsup",) + path.relative_to(root).with_suffix("").parts))
            for line, module in imports(path, root):
                if module.split(".")[0] in ("actors", "supervisor", "bpf"):
                    bad.append(f"{path.relative_to(root)}:{line} imports {module} outside the meshsup namespace")
                    continue
                target = layer(module)
                if target is None or target == own:
                    continue
                if target.startswith("kind:") or (own in ("shared", "bpf") and target == "supervisor"):
                    bad.append(f"{path.relative_to(root)}:{line} ({own}) imports {module} ({target})")
    return bad


def test_no_import_crosses_between_actor_kinds() -> None:
    assert crossings() == []


def test_the_boundary_check_sees_a_crossing(tmp_path: Path) -> None:
    for top in ("supervisor", "bpf", "actors/crypto", "actors/bus"):
        (tmp_path / top).mkdir(parents=True)
    (tmp_path / "actors/crypto/actor.py").write_text("from meshsup.actors.dns.wire import x\nfrom . import y\n")
    (tmp_path / "actors/bus/codec.py").write_text("from ..netlog import flows\n")
    (tmp_path / "supervisor/tree.py").write_text("import meshsup.actors.tunio.actor\nfrom actors.bus import codec\n")
    assert crossings(tmp_path) == [
        "actors/bus/codec.py:1 (shared) imports meshsup.actors.netlog (kind:netlog)",
        "actors/crypto/actor.py:1 (kind:crypto) imports meshsup.actors.dns.wire (kind:dns)",
        "supervisor/tree.py:1 (supervisor) imports meshsup.actors.tunio.actor (kind:tunio)",
        "supervisor/tree.py:2 imports actors.bus outside the meshsup namespace",
    ]


def test_every_package_folder_is_installed() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(("meshsup",) + p.parent.relative_to(ROOT).parts)
        for top in ("actors", "supervisor", "bpf")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert listed == on_disk
