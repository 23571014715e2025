"""Shared building blocks sit below the stages and identity/: no module imports upwards."""

import ast
from pathlib import Path

import pytest

MEDIATOR = Path(__file__).resolve().parents[1] / "mediator"


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize(("modules", "forbidden"), [
    (sorted((MEDIATOR / "identity").glob("*.py")), ("mediator.stages",)),
    ([MEDIATOR / name for name in ("addresses.py", "gcra.py", "decision.py", "errors.py", "request_view.py")],
     ("mediator.stages", "mediator.identity", "mediator.pipeline", "mediator.app", "mediator.chain")),
])
def test_no_upward_import(modules, forbidden):
    upward = sorted(f"{path.relative_to(MEDIATOR)} imports {name}" for path in modules for name in _imports(path)
                    if name.startswith(forbidden))
    assert upward == []
