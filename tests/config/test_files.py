"""The files a configuration names (TLS, clients' keys, the signing key) are read by `check`, `serve` and a
hot reload the way the running mediator reads them: every problem at the line that names the file, no
traceback, nothing written; documents-only loading (policy tests, explain) does not need them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mediator.certs import make_dev_pki
from mediator.cli import main
from mediator.config import load_config
from mediator.config.files import load_runnable_config, referenced_file_problems
from tests.test_policy_tests import shipped_copy


def _broken(root: Path) -> Path:
    """The shipped configuration with the dev PKI, then: the server certificate gone, vendor-a's key file
    holding a private key, and the signing key path under a regular file (cannot be made)."""
    shipped_copy(root)
    make_dev_pki(root / "certs", ("vendor-a", "vendor-b"))
    (root / "certs" / "server.crt").unlink()
    (root / "certs" / "vendor-a.crt").write_bytes((root / "certs" / "vendor-a.key").read_bytes())
    (root / "notadir").write_text("")
    clients = root / "policies" / "clients.yaml"
    clients.write_text(clients.read_text().replace("signing_key_file: certs/mediator-signing.key",
                                                   "signing_key_file: notadir/signing.key"))
    return root


def test_every_unusable_file_is_reported_at_the_line_that_names_it(tmp_path):
    root = _broken(tmp_path / "config")
    problems = [str(p) for p in referenced_file_problems(load_config(root))]
    assert len(problems) == 3, problems
    tls, vendor_a, signing = problems
    assert tls.startswith("channels.yaml:9:7: server.listen.tls.cert_file: certs/server.crt: no such file")
    assert vendor_a.startswith("policies/clients.yaml:20:7: clients.vendor-a.keys.public_key_file:")
    assert "holds a private key" in vendor_a
    assert signing.startswith("policies/clients.yaml:") and "token_service.signing_key_file:" in signing
    assert "absent and cannot be created" in signing
    assert not (root / "certs" / "mediator-signing.key").exists()   # nothing written


def test_a_fresh_clone_loads_for_policy_tests_without_any_key_file(tmp_path):
    root = shipped_copy(tmp_path / "config")       # no certs/ at all, as before `make certs`
    assert load_config(root).channels.channels      # documents only: fine
    problems = [str(p) for p in referenced_file_problems(load_config(root))]
    assert any("server.listen.tls.cert_file" in p for p in problems)
    assert any("clients.vendor-a.keys.public_key_file" in p for p in problems)


def test_a_complete_configuration_has_no_file_problem(tmp_path):
    root = shipped_copy(tmp_path / "config")
    make_dev_pki(root / "certs", ("vendor-a", "vendor-b"))
    assert load_runnable_config(root).channels.channels
    assert not (root / "certs" / "mediator-signing.key").exists()   # made at start, not by checking


def test_check_files_reports_them_and_exits_2(tmp_path, capsys, monkeypatch):
    root = _broken(tmp_path / "config")
    monkeypatch.setenv("OPENIMIS_USERNAME", "Admin")
    monkeypatch.setenv("OPENIMIS_PASSWORD", "x")
    assert main(["check", "--config", str(root), "--files"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and err[0].startswith("channels.yaml:9:7:")
    # Without --files (a policy repository's CI holds no TLS key): the documents only.
    assert main(["check", "--config", str(root)]) == 0


def test_serve_refuses_them_in_lines_not_a_traceback(tmp_path):
    root = _broken(tmp_path / "config")
    done = subprocess.run([sys.executable, "-m", "mediator", "serve", "--config", str(root)],
                          capture_output=True, text=True, timeout=60,
                          env={"OPENIMIS_USERNAME": "Admin", "OPENIMIS_PASSWORD": "x", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[0].startswith("channels.yaml:9:7: server.listen.tls.cert_file:")
