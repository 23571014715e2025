"""A real openIMIS backend for the end-to-end tests (tests/openimis/harness.py).

Started once per session when PostgreSQL is reachable (CI has it); otherwise every test here is
skipped with a loud reason. If the session started the backend, it stops it at the end; a backend
that was already running (a developer's `harness.py up`) is left running.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

_HARNESS_PATH = Path(__file__).parents[1] / "openimis" / "harness.py"


def _load_harness() -> Any:
    spec = importlib.util.spec_from_file_location("openimis_harness", _HARNESS_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["openimis_harness"] = module
    spec.loader.exec_module(module)
    return module


harness = _load_harness()


@pytest.fixture(scope="session")
def openimis(pytestconfig: pytest.Config) -> Any:
    if not harness.postgres_reachable():
        pytest.skip("REAL openIMIS END-TO-END TESTS NOT RUN: PostgreSQL is not reachable on 127.0.0.1:5432")
    # Several test sessions may share the backend (a developer's `harness.py up`, parallel runs): each
    # registers itself, and the backend is stopped only by the session that started it, once no other
    # live session is registered.
    users = harness.cache_dir() / "sessions"
    users.mkdir(parents=True, exist_ok=True)
    mine = users / str(os.getpid())
    mine.touch()
    was_running = harness.running() is not None
    try:
        # The harness reports progress (and a heartbeat every 30 s) on stderr; pytest would capture it
        # and the first `make test` would look hung for minutes while openIMIS installs.
        capture = pytestconfig.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            if not was_running:
                print("\n[openimis-harness] starting the real openIMIS backend for the e2e tests; the first run "
                      "installs it (about 3 minutes), later runs start it in about 15 s", file=sys.stderr, flush=True)
            backend = harness.ensure_running()
        yield backend
    finally:
        mine.unlink(missing_ok=True)
        others = [p for p in users.iterdir() if p.name.isdigit() and harness._pid_alive(int(p.name))]
        if not was_running and not others:
            harness.down()

    return True


def e2e_channels(fhir_base_url: str, channels: str, extra_server: str = "") -> str:
    """channels.yaml in front of the real openIMIS at `fhir_base_url` (tests/e2e/vendors.py has the channels)."""
    from tests.conftest import channels_yaml

    return channels_yaml(fhir_base_url.rstrip("/") + "/", channels=textwrap.dedent(channels),
                         extra_server=extra_server)


from tests.e2e.vendors import vendors  # noqa: E402,F401  (the fixture, shared by the e2e modules)
