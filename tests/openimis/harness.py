#!/usr/bin/env python3
"""Run a REAL openIMIS backend (Django modules from PyPI) on loopback for the mediator's e2e tests.

Standard library only. Usable as a module (pytest session fixture) and as a CLI:

    python tests/openimis/harness.py up [--fresh-db] [--port N] [--workers N] [--timeout S]
    python tests/openimis/harness.py status [--json]
    python tests/openimis/harness.py env [--json]      # shell `export` lines of the running backend
    python tests/openimis/harness.py down

`up` is idempotent: it (1) creates a venv in the cache dir and pip-installs requirements-latest.txt
(skipped when its marker matches), (2) restores data/IMIS_latest_migrated.dump into a fresh
PostgreSQL database (skipped when the database's marker comment matches), (3) applies
data/refresh-demo-policies.sql, (4) starts gunicorn (daemonized, --preload, 2 workers) on
127.0.0.1, (5) waits until `POST /api/api_fhir_r4/login/` returns a token for Admin and for the
demo claim administrators, and (6) writes state.json. A running healthy backend started with the
same configuration is reused. `down` stops it and leaves no process behind.

Environment (all optional):
    OPENIMIS_CACHE          cache dir (default ~/.cache/openimis-mediator/openimis-<pinhash>)
    OPENIMIS_PORT           port to serve on (default: a free port)
    OPENIMIS_WORKERS        gunicorn workers (default 2)
    OPENIMIS_DB_NAME        database name (default openimis_e2e)
    OPENIMIS_PGHOST / OPENIMIS_PGPORT / OPENIMIS_PGUSER / OPENIMIS_PGPASSWORD
                            PostgreSQL (default 127.0.0.1 / 5432 / postgres / none)
    OPENIMIS_PG_BINDIR      where psql and pg_restore are (default: PATH)
    OPENIMIS_PYTHON         interpreter for the venv (default: this one if >= 3.11, else python3.11)
    OPENIMIS_START_TIMEOUT  seconds to wait for the server to answer logins (default 240)
    OPENIMIS_PIP_TIMEOUT    seconds for pip install (default 1800)
    OPENIMIS_FRESH_DB=1     same as `up --fresh-db`
Passed through to the backend (a running one started with other values is restarted):
    ROW_SECURITY (default true), AXES_ENABLED (login lockout, default false), DEBUG (default true,
    as MODE=dev), OPENIMIS_MODULES, OPENIMIS_LOG_LEVEL, RATELIMIT_RATE, LOGIN_LOCKOUT_*,
    OPENIMIS_GC_FREEZE=1 (each gunicorn worker calls gc.freeze() after the fork: backend/gunicorn_gc_freeze.py).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / "data"
BACKEND_DIR = HERE / "backend"
REQUIREMENTS = HERE / "requirements-latest.txt"
DUMP = DATA_DIR / "IMIS_latest_migrated.dump"
REFRESH_SQL = DATA_DIR / "refresh-demo-policies.sql"
CLAIM_PAYLOAD = DATA_DIR / "payloads" / "claim-verified.json"

FHIR_PATH = "/api/api_fhir_r4"
LOGIN_PATH = FHIR_PATH + "/login/"
GRAPHQL_PATH = "/api/graphql"

ADMIN = ("Admin", "admin123")
# Demo health facilities and their claim administrators (login = code = password), from DEMO-DATA.md.
# hf_code: (hf_uuid, claim_admin_code, claim_admin_uuid)
HEALTH_FACILITIES = {
    "RADS002": ("f988cfd9-eba2-446e-8e6d-bfcbf8e53b9a", "RADS0021", "2a4ded90-6102-4a6a-aaca-3e621f282d2c"),
    "RAHC001": ("8403fe10-dc83-41a0-90a2-9fab63928275", "RAHC0011", "d5c6a541-7144-4666-a461-8c53b28ab6fa"),
    "RAHOS001": ("d8a25f21-f36a-4d4d-9e58-1db8ffbe7036", "RHOS0011", "598e43ca-9977-4f4b-a678-992528ce3454"),
    "JMDP001": ("079e777b-b12b-4763-a646-3773e906f9d7", "JMDP0011", "53d8bd54-f155-4dec-8564-8045c199dc3c"),
    "JMHC001": ("7e0d15b9-aa6f-4e2e-9b69-0332f2d78a07", "JMHC0011", "c60bacae-2aac-4bbf-bdad-7258ebb75f1f"),
    "JMHOS001": ("026e088a-fbd5-474e-8d42-069958a34127", "JHOS0011", "4a3f1a0a-e13c-451a-9511-a4d0fe35d20b"),
    "UPDS001": ("1d43dfbf-c160-4373-b774-bee598c83262", "UPDS0011", "a3567d2e-8399-44e9-a0fd-c79eadbc53f3"),
    "UPHC001": ("fb83cef0-d793-4574-a5e7-9481d7c4777a", "UPHC0011", "c997c057-a501-4be9-b6ac-19371292d071"),
    "UPHOS001": ("e5131cc5-bcd6-460c-b6bb-54da3f2506f2", "UHOS0011", "ccf5176d-9261-4e8c-8359-21a9baf9a348"),
    "RADS001": ("8782079c-aa5b-43c3-97ab-b8b8a3fa5df2", "RADS0011", "0b3daea6-c129-429d-a350-199f3219a301"),
    "ROHC001": ("0e095e81-9d5d-4b39-9ac7-91d22509bf06", "ROHC0011", "7ebb8ae8-a77f-4529-b369-f8e4a32387e4"),
    "ROHOS001": ("1ebc4a36-d143-45eb-ab93-d7e973d8f14b", "RHOS0012", "02322c10-3a7e-49e8-a7f5-e7f4a31c0293"),
    "VIDS001": ("5c08e764-04ed-42a0-bbea-fe0ea4c08a3f", "VIDS0011", "b4ea00c1-c7d6-4eaa-96a3-60e2d36484b3"),
    "VIHC001": ("bc1da96c-ad55-4978-9dca-59335adc7469", "VIHC0011", "b004f0dd-9a02-4775-ad0e-0e4005bffe2e"),
    "VIHOS001": ("05c0d312-7cf2-4e21-8004-a78eec008f5a", "VHOS0011", "f67b39d7-103b-4d00-b0b5-5fe8e8bd0382"),
}
CLAIM_ADMINS = {ca: hf for hf, (_, ca, _) in HEALTH_FACILITIES.items()}  # claim admin code -> hf code
INSUREE_070707070_UUID = "0539afeb-21a1-4b3f-9478-23e6f41b0024"


# Environment variables read by backend/openIMIS/settings.py that callers may set (e.g. ROW_SECURITY=false to
# see openIMIS without its per-facility row security): a running backend started with other values is restarted.
BACKEND_ENV_KNOBS = (
    "ROW_SECURITY",
    "AXES_ENABLED",
    "DEBUG",
    "OPENIMIS_MODULES",
    "OPENIMIS_LOG_LEVEL",
    "RATELIMIT_RATE",
    "LOGIN_LOCKOUT_FAILURE_LIMIT",
    "LOGIN_LOCKOUT_COOLOFF_TIME",
    "OPENIMIS_GC_FREEZE",
)


class HarnessError(RuntimeError):
    """Raised when the backend cannot be set up; the message names the log file to read."""


# --------------------------------------------------------------------------------------------------
# configuration


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip() or default


def _sha(data: bytes, n: int = 12) -> str:
    return hashlib.sha256(data).hexdigest()[:n]


def _file_sha(path: Path, n: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def _venv_python_for_creation() -> str:
    explicit = _env("OPENIMIS_PYTHON")
    if explicit:
        return explicit
    return sys.executable
    for name in ("python3.11", "python3.12", "python3.13"):
        found = shutil.which(name)
        if found:
            return found
    raise HarnessError("openIMIS needs Python >= 3.11 for its venv: set OPENIMIS_PYTHON")


def _python_tag(python: str) -> str:
    if python == sys.executable:
        return f"{sys.version_info[0]}.{sys.version_info[1]}"
    out = subprocess.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout.strip()


def pin_hash() -> str:
    """Identifies one installed backend: the pins plus the interpreter's minor version."""
    python = _venv_python_for_creation()
    return _sha(REQUIREMENTS.read_bytes() + b"\npython=" + _python_tag(python).encode())


def cache_dir() -> Path:
    explicit = _env("OPENIMIS_CACHE")
    if explicit:
        return Path(explicit).expanduser().resolve()
    base = Path(_env("XDG_CACHE_HOME", str(Path.home() / ".cache"))).expanduser()
    return base / "openimis-mediator" / f"openimis-{pin_hash()}"


class Config:
    def __init__(
        self,
        port: int | None = None,
        workers: int | None = None,
        fresh_db: bool = False,
        start_timeout: float | None = None,
    ):
        self.cache = cache_dir()
        self.venv = self.cache / "venv"
        self.logs = self.cache / "logs"
        self.state_file = self.cache / "state.json"
        self.pid_file = self.cache / "gunicorn.pid"
        self.server_log = self.logs / "server.log"
        self.access_log = self.logs / "access.log"
        self.setup_log = self.logs / "setup.log"
        self.port = port if port is not None else int(_env("OPENIMIS_PORT", "0") or 0)
        self.workers = workers if workers is not None else int(_env("OPENIMIS_WORKERS", "2"))
        self.fresh_db = fresh_db or _env("OPENIMIS_FRESH_DB", "0").lower() in ("1", "true", "yes")
        self.start_timeout = (
            start_timeout if start_timeout is not None else float(_env("OPENIMIS_START_TIMEOUT", "240"))
        )
        self.pip_timeout = float(_env("OPENIMIS_PIP_TIMEOUT", "1800"))
        self.db_name = _env("OPENIMIS_DB_NAME", "openimis_e2e")
        self.pg_host = _env("OPENIMIS_PGHOST", "127.0.0.1")
        self.pg_port = int(_env("OPENIMIS_PGPORT", "5432"))
        self.pg_user = _env("OPENIMIS_PGUSER", "postgres")
        self.pg_password = os.environ.get("OPENIMIS_PGPASSWORD", "")
        self.pg_bindir = _env("OPENIMIS_PG_BINDIR")

    # server configuration that, when changed, requires a restart of a running backend
    def server_fingerprint(self) -> str:
        h = hashlib.sha256(str(BACKEND_DIR).encode() + b"\0")
        for path in sorted(BACKEND_DIR.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            h.update(str(path.relative_to(BACKEND_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
        h.update(f"{self.db_name}|{self.pg_host}|{self.pg_port}|{self.pg_user}|{self.workers}".encode())
        for name in BACKEND_ENV_KNOBS:
            h.update(f"|{name}={os.environ.get(name, '')}".encode())
        h.update(REQUIREMENTS.read_bytes())
        return h.hexdigest()[:16]

    def db_marker(self) -> str:
        return f"openimis-harness dump={_file_sha(DUMP)} refresh={_file_sha(REFRESH_SQL)}"

    def pg_tool(self, name: str) -> str:
        if self.pg_bindir:
            return str(Path(self.pg_bindir) / name)
        found = shutil.which(name)
        if not found:
            raise HarnessError(f"`{name}` not found on PATH (PostgreSQL client tools; or set OPENIMIS_PG_BINDIR)")
        return found

    def pg_env(self) -> dict:
        env = dict(os.environ)
        env.update(PGHOST=self.pg_host, PGPORT=str(self.pg_port), PGUSER=self.pg_user, PGCONNECT_TIMEOUT="5")
        if self.pg_password:
            env["PGPASSWORD"] = self.pg_password
        return env


# --------------------------------------------------------------------------------------------------
# output, locking, small helpers

_T0 = time.monotonic()


def _say(msg: str) -> None:
    print(f"[openimis-harness +{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
        return "\n".join(data.splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def _locked(cfg: Config, timeout: float = 3600.0):
    """Serializes harness runs sharing one cache dir (e.g. pytest-xdist workers, parallel CLIs)."""
    cfg.cache.mkdir(parents=True, exist_ok=True)
    with open(cfg.cache / ".harness.lock", "a+") as fh:
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if not told:
                    _say(f"waiting for another harness run holding {cfg.cache / '.harness.lock'}")
                    told = True
                if time.monotonic() > deadline:
                    raise HarnessError(f"timed out waiting for the harness lock in {cfg.cache}") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _run(
    cmd: list,
    log: Path,
    timeout: float,
    env: dict | None = None,
    what: str = "",
    heartbeat: float = 30,
    cwd: str | None = None,
) -> None:
    """Runs cmd with output appended to log; prints a heartbeat; raises HarnessError (with log tail)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(map(str, cmd))}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        start = time.monotonic()
        try:
            while True:
                try:
                    rc = proc.wait(timeout=min(heartbeat, max(0.1, timeout - (time.monotonic() - start))))
                    break
                except subprocess.TimeoutExpired:
                    elapsed = time.monotonic() - start
                    if elapsed >= timeout:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                        raise HarnessError(
                            f"{what or cmd[0]} timed out after {timeout:.0f}s; log: {log}\n{_tail(log)}"
                        ) from None
                    _say(f"  ... {what or cmd[0]} still running ({elapsed:.0f}s), log: {log}")
        except BaseException:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise
    if rc != 0:
        raise HarnessError(f"{what or cmd[0]} failed (exit {rc}); log: {log}\n{_tail(log)}")


def _http(
    method: str, url: str, body: dict | None = None, token: str | None = None, timeout: float = 30.0
) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def login(base_url: str, username: str, password: str, timeout: float = 30.0) -> str:
    """FHIR login; returns the bearer token or raises HarnessError."""
    status, body = _http("POST", base_url + LOGIN_PATH, {"username": username, "password": password}, timeout=timeout)
    if status == 200:
        with contextlib.suppress(ValueError):
            token = json.loads(body).get("token")
            if token:
                return token
    raise HarnessError(f"FHIR login of {username} answered {status}: {body[:200]!r}")


def graphql_token_auth(base_url: str, username: str, password: str, timeout: float = 30.0) -> int:
    """GraphQL tokenAuth (the 24.04 line needs one before the first FHIR login of a demo user)."""
    query = "mutation($u:String!,$p:String!){tokenAuth(username:$u,password:$p){token}}"
    status, _ = _http(
        "POST", base_url + GRAPHQL_PATH, {"query": query, "variables": {"u": username, "p": password}}, timeout=timeout
    )
    return status


def claim_payload(code: str | None = None) -> dict:
    """The verified Claim (insuree 070707070, JMHOS001, claim admin JHOS0011) with a fresh claim code.

    openIMIS answers 500 to a reused claim code, so every POST needs a new one (<= 50 chars;
    the demo codes are 8)."""
    claim = json.loads(CLAIM_PAYLOAD.read_text())
    claim["identifier"][0]["value"] = code or ("E2E" + uuid.uuid4().hex[:12].upper())
    return claim


def postgres_reachable(timeout: float = 5.0) -> bool:
    """True when the configured PostgreSQL accepts a connection and psql/pg_restore exist. Never raises."""
    try:
        cfg = Config()
        with socket.create_connection((cfg.pg_host, cfg.pg_port), timeout=timeout):
            pass
        cfg.pg_tool("pg_restore")
        out = subprocess.run(
            [cfg.pg_tool("psql"), "-d", "postgres", "-Atqc", "select 1"],
            env=cfg.pg_env(),
            capture_output=True,
            text=True,
            timeout=timeout + 5,
            stdin=subprocess.DEVNULL,
        )
        return out.returncode == 0 and out.stdout.strip() == "1"
    except Exception:
        return False


# --------------------------------------------------------------------------------------------------
# venv


def _venv_bin(cfg: Config, name: str) -> Path:
    return cfg.venv / "bin" / name


def ensure_venv(cfg: Config) -> None:
    marker = cfg.venv / ".openimis-installed"
    want = _sha(REQUIREMENTS.read_bytes(), 16)
    if marker.is_file() and marker.read_text().strip() == want and _venv_bin(cfg, "gunicorn").exists():
        _say(f"venv ready ({cfg.venv})")
        return
    python = _venv_python_for_creation()
    _say(f"creating venv {cfg.venv} with {python}")
    if cfg.venv.exists():
        shutil.rmtree(cfg.venv)
    _run([python, "-m", "venv", str(cfg.venv)], cfg.setup_log, 300, what="python -m venv")
    _say(f"pip installing the openIMIS backend ({REQUIREMENTS.name}); ~2 min; log: {cfg.setup_log}")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    _run(
        [
            str(_venv_bin(cfg, "python")),
            "-m",
            "pip",
            "install",
            "--no-input",
            "--progress-bar",
            "off",
            "setuptools<81",
            "wheel",
        ],
        cfg.setup_log,
        600,
        env=env,
        what="pip install setuptools",
    )
    _run(
        [
            str(_venv_bin(cfg, "python")),
            "-m",
            "pip",
            "install",
            "--no-input",
            "--progress-bar",
            "off",
            "-r",
            str(REQUIREMENTS),
        ],
        cfg.setup_log,
        cfg.pip_timeout,
        env=env,
        what="pip install",
    )
    marker.write_text(want + "\n")
    _say("venv installed")


def installed_versions(cfg: Config) -> dict:
    code = (
        "import json, importlib.metadata as m\n"
        "names = sorted(d.metadata['Name'] for d in m.distributions())\n"
        "keep = [n for n in names if n.lower().startswith('openimis') or n.lower() in "
        "('django', 'gunicorn', 'fhir.resources', 'djangorestframework', 'psycopg2-binary')]\n"
        "print(json.dumps({n: m.version(n) for n in keep}))\n"
    )
    try:
        out = subprocess.run(
            [str(_venv_bin(cfg, "python")), "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            cwd=str(cfg.cache),
        )
        return json.loads(out.stdout) if out.returncode == 0 else {}
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}


# --------------------------------------------------------------------------------------------------
# database


def _psql(cfg: Config, sql: str, db: str = "postgres", timeout: float = 60) -> str:
    out = subprocess.run(
        [cfg.pg_tool("psql"), "-d", db, "-v", "ON_ERROR_STOP=1", "-Atqc", sql],
        env=cfg.pg_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if out.returncode != 0:
        raise HarnessError(f"psql failed on {db}: {sql[:120]}\n{out.stderr.strip()}")
    return out.stdout.strip()


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _db_comment(cfg: Config, db: str) -> str:
    return _psql(
        cfg,
        f"select coalesce(shobj_description(oid, 'pg_database'), '') from pg_database where datname = {_quote_lit(db)}",
    )


def _db_exists(cfg: Config, db: str) -> bool:
    return _psql(cfg, f"select 1 from pg_database where datname = {_quote_lit(db)}") == "1"


def _drop_db(cfg: Config, db: str) -> None:
    _psql(cfg, f"DROP DATABASE IF EXISTS {_quote_ident(db)} WITH (FORCE)")


MAX_CLAIMS_CREATED_BY_TESTS = 40
"""`up` restores the demo database anew when it holds more live claims than this created by tests."""


def _claims_created_by_tests(cfg: Config) -> int:
    """Live claims created in the last 400 days: the demo data's claims are from 2018-2019, so these are the
    ones test runs submitted. 0 when the database is not there (yet)."""
    if not postgres_reachable() or not _db_exists(cfg, cfg.db_name):
        return 0
    out = _psql(cfg, 'select count(*) from "tblClaim" where "ValidityTo" is null and '
                '"ValidityFrom" > now() - interval \'400 days\'', db=cfg.db_name)
    return int(out) if out.strip().isdigit() else 0


def ensure_database(cfg: Config) -> None:
    if not postgres_reachable():
        raise HarnessError(
            f"PostgreSQL not reachable at {cfg.pg_host}:{cfg.pg_port} as {cfg.pg_user} (or psql/pg_restore missing)"
        )
    marker = cfg.db_marker()
    if not cfg.fresh_db and _db_exists(cfg, cfg.db_name) and _db_comment(cfg, cfg.db_name) == marker:
        _say(f"database {cfg.db_name} ready (restored earlier; `up --fresh-db` to restore anew)")
    else:
        tmp = cfg.db_name + "__restoring"
        _say(f"restoring {DUMP.name} into a fresh database {cfg.db_name}")
        _drop_db(cfg, tmp)
        _psql(cfg, f"CREATE DATABASE {_quote_ident(tmp)} ENCODING 'UTF8' TEMPLATE template0")
        # The dump holds CREATE EXTENSION "postgres-json-schema" (no openIMIS code path used here needs
        # it); keep it only when the server has that extension installed.
        listing = subprocess.run(
            [cfg.pg_tool("pg_restore"), "-l", str(DUMP)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
            stdin=subprocess.DEVNULL,
        ).stdout
        has_ext = _psql(cfg, "select 1 from pg_available_extensions where name = 'postgres-json-schema'") == "1"
        if not has_ext:
            listing = "\n".join(line for line in listing.splitlines() if "postgres-json-schema" not in line)
        list_file = cfg.cache / "restore.list"
        list_file.write_text(listing + "\n")
        _run(
            [
                cfg.pg_tool("pg_restore"),
                "--no-owner",
                "--no-acl",
                "--exit-on-error",
                "-d",
                tmp,
                "-L",
                str(list_file),
                str(DUMP),
            ],
            cfg.setup_log,
            600,
            env=cfg.pg_env(),
            what="pg_restore",
        )
        _run(
            [cfg.pg_tool("psql"), "-d", tmp, "-v", "ON_ERROR_STOP=1", "-q", "-f", str(REFRESH_SQL)],
            cfg.setup_log,
            120,
            env=cfg.pg_env(),
            what="refresh-demo-policies",
        )
        _psql(cfg, f"COMMENT ON DATABASE {_quote_ident(tmp)} IS {_quote_lit(marker)}")
        _drop_db(cfg, cfg.db_name)
        _psql(cfg, f"ALTER DATABASE {_quote_ident(tmp)} RENAME TO {_quote_ident(cfg.db_name)}")
        _say(f"database {cfg.db_name} restored")
    # idempotent: keeps the demo policies valid (expiry 2030) whatever the tests did
    _run(
        [cfg.pg_tool("psql"), "-d", cfg.db_name, "-v", "ON_ERROR_STOP=1", "-q", "-f", str(REFRESH_SQL)],
        cfg.setup_log,
        120,
        env=cfg.pg_env(),
        what="refresh-demo-policies",
    )


# --------------------------------------------------------------------------------------------------
# server process


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _is_our_server(pid: int, cfg: Config) -> bool:
    cmd = _cmdline(pid)
    return _pid_alive(pid) and "openIMIS.wsgi" in cmd and str(cfg.pid_file) in cmd


def _server_processes(cfg: Config) -> list[int]:
    """Live processes of this cache dir's gunicorn (master and workers), found by their command line."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            cmd = _cmdline(int(entry))
            if "openIMIS.wsgi" in cmd and str(cfg.pid_file) in cmd and _pid_alive(int(entry)):
                found.append(int(entry))
    return found


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            kids.append(int(entry))
    return kids


def _read_state(cfg: Config) -> dict | None:
    try:
        return json.loads(cfg.state_file.read_text())
    except (OSError, ValueError):
        return None


def _write_state(cfg: Config, state: dict) -> None:
    tmp = cfg.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, cfg.state_file)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _healthy(base_url: str, timeout: float = 10.0) -> bool:
    try:
        login(base_url, *ADMIN, timeout=timeout)
        return True
    except (HarnessError, OSError):
        return False


def _stop_pid(pid: int, cfg: Config, grace: float = 20.0) -> None:
    """SIGTERM the gunicorn master (graceful), then SIGKILL whatever of its group is left."""
    if not _is_our_server(pid, cfg):
        return
    workers = _children(pid)
    try:  # gunicorn --daemon forks, setsid()s and forks again: its group holds only gunicorn processes
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        pgid = None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (_pid_alive(pid) or any(_pid_alive(w) for w in workers)):
        time.sleep(0.2)
    leftovers = [p for p in [pid, *workers] if _pid_alive(p)]
    if leftovers:
        _say(f"force-killing {leftovers}")
        if pgid and pgid != os.getpgrp():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        for p in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_pid_alive(p) for p in leftovers):
            time.sleep(0.1)


def _server_env(cfg: Config, port: int) -> dict:
    env = dict(os.environ)
    for key in list(env):  # never leak the caller's virtualenv or Django settings into the backend
        if key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "DJANGO_SETTINGS_MODULE"):
            env.pop(key)
    env.update(
        DJANGO_SETTINGS_MODULE="openIMIS.settings",
        DB_ENGINE="django.db.backends.postgresql",
        DB_NAME=cfg.db_name,
        DB_HOST=cfg.pg_host,
        DB_PORT=str(cfg.pg_port),
        DB_USER=cfg.pg_user,
        DB_PASSWORD=cfg.pg_password,
        SITE_ROOT="api",
        SITE_URL=f"127.0.0.1:{port}",
        MODE="DEV",
        PYTHONUNBUFFERED="1",
        PYTHONPYCACHEPREFIX=str(cfg.cache / "pycache"),
        PATH=f"{cfg.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def _start_server(cfg: Config, previous_port: int | None = None) -> dict:
    port = cfg.port
    if not port and previous_port and not _port_in_use(previous_port):
        port = previous_port  # keep the URL stable across restarts when possible
    port = port or _free_port()
    if _port_in_use(port):
        raise HarnessError(f"port {port} is already in use on 127.0.0.1 (set OPENIMIS_PORT to another)")
    base_url = f"http://127.0.0.1:{port}"
    cfg.logs.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        cfg.pid_file.unlink()
    with open(cfg.server_log, "ab") as f:
        f.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} starting on {base_url}\n".encode())
    cmd = [
        str(_venv_bin(cfg, "gunicorn")),
        "openIMIS.wsgi:application",
        "--chdir",
        str(BACKEND_DIR),
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(cfg.workers),
        "--preload",
        "--daemon",
        "--pid",
        str(cfg.pid_file),
        "--timeout",
        "120",
        "--graceful-timeout",
        "10",
        "--error-logfile",
        str(cfg.server_log),
        "--access-logfile",
        str(cfg.access_log),
        "--capture-output",
        "--no-control-socket",
    ]
    if os.environ.get("OPENIMIS_GC_FREEZE") == "1":  # README "openIMIS facts the mediator lives with"
        cmd += ["--config", str(BACKEND_DIR / "gunicorn_gc_freeze.py")]
    _say(f"starting gunicorn ({cfg.workers} workers) on {base_url}; log: {cfg.server_log}")
    started = time.monotonic()
    _run(cmd, cfg.server_log, 60, env=_server_env(cfg, port), what="gunicorn --daemon", cwd=str(BACKEND_DIR))

    pid = None
    deadline = started + cfg.start_timeout
    while time.monotonic() < deadline:
        if pid is None:
            with contextlib.suppress(OSError, ValueError):
                pid = int(cfg.pid_file.read_text().strip())
        if pid is not None and not _pid_alive(pid):
            raise HarnessError(
                f"openIMIS server exited during start-up; log: {cfg.server_log}\n{_tail(cfg.server_log)}"
            )
        if pid is not None and _healthy(base_url, timeout=10):
            break
        if pid is None and time.monotonic() - started > 3 and not _server_processes(cfg):
            raise HarnessError(
                f"openIMIS server exited during start-up; log: {cfg.server_log}\n{_tail(cfg.server_log)}"
            )
        time.sleep(0.5)
    else:
        if pid is not None:
            _stop_pid(pid, cfg)
        raise HarnessError(
            f"openIMIS did not answer the Admin FHIR login within {cfg.start_timeout:.0f}s; "
            f"log: {cfg.server_log}\n{_tail(cfg.server_log)}"
        )
    _say(f"server answers logins after {time.monotonic() - started:.1f}s (pid {pid})")
    try:
        _prime_demo_users(base_url)
    except BaseException:
        _stop_pid(pid, cfg)
        raise
    return {"pid": pid, "port": port, "base_url": base_url}


def _prime_demo_users(base_url: str) -> None:
    """Every demo claim admin must get a FHIR token; on the 24.04 line a GraphQL tokenAuth creates the
    user's record first. Also warms both workers up."""
    failed = []
    for code in CLAIM_ADMINS:
        try:
            login(base_url, code, code)
        except HarnessError:
            graphql_token_auth(base_url, code, code)
            try:
                login(base_url, code, code)
            except HarnessError as exc:
                failed.append(str(exc))
    if failed:
        raise HarnessError("claim administrators cannot log in to FHIR:\n" + "\n".join(failed))
    for _ in range(4):
        login(base_url, *ADMIN)
    _say(f"Admin and {len(CLAIM_ADMINS)} claim administrators log in to FHIR")


# --------------------------------------------------------------------------------------------------
# public API


def _public(state: dict, cfg: Config) -> dict:
    base = state["base_url"]
    return {
        "base_url": base,
        "fhir_base_url": base + FHIR_PATH,
        "login_url": base + LOGIN_PATH,
        "graphql_url": base + GRAPHQL_PATH,
        "pid": state["pid"],
        "port": state["port"],
        "db_name": state.get("db_name", cfg.db_name),
        "cache_dir": str(cfg.cache),
        "server_log": str(cfg.server_log),
        "state_file": str(cfg.state_file),
        "started_at": state.get("started_at"),
        "versions": state.get("versions", {}),
        "admin": list(ADMIN),
    }


def running(cfg: Config | None = None) -> dict | None:
    """The running backend's info (as ensure_running returns it) if it is alive and healthy, else None."""
    cfg = cfg or Config()
    state = _read_state(cfg)
    if not state or not _is_our_server(int(state.get("pid", 0)), cfg):
        return None
    if not _healthy(state["base_url"]):
        return None
    return _public(state, cfg)


def up(
    port: int | None = None, workers: int | None = None, fresh_db: bool = False, start_timeout: float | None = None
) -> dict:
    """Idempotently installs, restores and starts the backend; returns its info dict."""
    cfg = Config(port=port, workers=workers, fresh_db=fresh_db, start_timeout=start_timeout)
    t0 = time.monotonic()
    with _locked(cfg):
        grown = _claims_created_by_tests(cfg)
        if not cfg.fresh_db and grown > MAX_CLAIMS_CREATED_BY_TESTS:
            # Every suite run submits claims; tests that page through a facility's claims would slow down
            # without bound on a database that outlives many runs (a CI machine keeps it).
            _say(f"database {cfg.db_name} holds {grown} claims created by tests (> {MAX_CLAIMS_CREATED_BY_TESTS}):"
                 " restoring it anew")
            cfg.fresh_db = True
        state = _read_state(cfg)
        fingerprint = cfg.server_fingerprint()
        if state and _is_our_server(int(state.get("pid", 0)), cfg):
            reusable = (
                state.get("fingerprint") == fingerprint
                and not cfg.fresh_db
                and (not cfg.port or cfg.port == state.get("port"))
                and _healthy(state["base_url"])
            )
            if reusable:
                _say(f"reusing running openIMIS backend {state['base_url']} (pid {state['pid']})")
                return _public(state, cfg)
            why = "--fresh-db requested" if cfg.fresh_db else "unhealthy, reconfigured or other port asked"
            _say(f"stopping the previous backend (pid {state['pid']}): {why}")
            _stop_pid(int(state["pid"]), cfg)
        previous_port = int(state.get("port", 0)) if state else None
        with contextlib.suppress(FileNotFoundError):
            cfg.state_file.unlink()
        ensure_venv(cfg)
        ensure_database(cfg)
        info = _start_server(cfg, previous_port)
        state = {
            **info,
            "fingerprint": fingerprint,
            "db_name": cfg.db_name,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": installed_versions(cfg),
        }
        _write_state(cfg, state)
        _say(f"openIMIS backend ready at {info['base_url']} in {time.monotonic() - t0:.1f}s")
        return _public(state, cfg)


def ensure_running(**kwargs) -> dict:
    """For a pytest session fixture: returns dict(base_url, fhir_base_url, login_url, graphql_url, pid,
    port, db_name, cache_dir, server_log, state_file, started_at, versions, admin)."""
    return up(**kwargs)


def down() -> bool:
    """Stops the backend started by `up` (if any). Returns True if one was stopped."""
    cfg = Config()
    with _locked(cfg):
        state = _read_state(cfg)
        pid = int(state.get("pid", 0)) if state else 0
        if not pid:
            with contextlib.suppress(OSError, ValueError):
                pid = int(cfg.pid_file.read_text().strip())
        stopped = False
        if pid and _is_our_server(pid, cfg):
            _say(f"stopping openIMIS backend (pid {pid})")
            _stop_pid(pid, cfg)
            stopped = True
        else:
            _say("no openIMIS backend running")
        orphans = _server_processes(cfg)  # e.g. state file lost: anything running on our pid file is ours
        if orphans:
            _say(f"killing leftover server processes {orphans}")
            for p in orphans:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            stopped = True
        for path in (cfg.state_file, cfg.pid_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return stopped


def server_memory(pid: int) -> dict:
    """RSS and PSS (kB) of the gunicorn master and its workers."""
    out = {}
    for p in [pid, *_children(pid)]:
        entry = {}
        for fname, key, name in (("status", "VmRSS:", "rss_kb"), ("smaps_rollup", "Pss:", "pss_kb")):
            with contextlib.suppress(OSError), open(f"/proc/{p}/{fname}") as f:
                for line in f:
                    if line.startswith(key):
                        entry[name] = int(line.split()[1])
                        break
        out[p] = entry
    return out


# --------------------------------------------------------------------------------------------------
# CLI


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="install/restore/start (idempotent); prints the info JSON")
    p_up.add_argument("--fresh-db", action="store_true", help="restore the database anew")
    p_up.add_argument("--port", type=int, default=None)
    p_up.add_argument("--workers", type=int, default=None)
    p_up.add_argument("--timeout", type=float, default=None, help="start-up timeout (s)")
    sub.add_parser("down", help="stop the backend")
    p_st = sub.add_parser("status", help="is it running? (exit 0 yes, 3 no)")
    p_st.add_argument("--json", action="store_true")
    p_env = sub.add_parser("env", help="print `export OPENIMIS_...=` lines (exit 3 if not running)")
    p_env.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    try:
        if args.cmd == "up":
            info = up(port=args.port, workers=args.workers, fresh_db=args.fresh_db, start_timeout=args.timeout)
            print(json.dumps(info, indent=2))
            return 0
        if args.cmd == "down":
            down()
            return 0
        cfg = Config()
        info = running(cfg)
        if args.cmd == "status":
            if info:
                info["memory"] = server_memory(info["pid"])
            if args.json:
                print(json.dumps(info or {"running": False}, indent=2))
            elif info:
                mem = info["memory"]
                rss = sum(v.get("rss_kb", 0) for v in mem.values()) // 1024
                pss = sum(v.get("pss_kb", 0) for v in mem.values()) // 1024
                print(
                    f"running: {info['base_url']} pid {info['pid']} ({len(mem) - 1} workers, "
                    f"RSS {rss} MB, PSS {pss} MB)\nfhir: {info['fhir_base_url']}\ndb: {info['db_name']}\n"
                    f"log: {info['server_log']}\nversions: "
                    + ", ".join(
                        f"{k}={v}"
                        for k, v in info["versions"].items()
                        if "api_fhir" in k or k.lower() in ("openimis-be-core", "django")
                    )
                )
            else:
                print(f"not running (cache {cfg.cache})")
            return 0 if info else 3
        if args.cmd == "env":
            if not info:
                print("openIMIS backend not running: run `harness.py up`", file=sys.stderr)
                return 3
            env = {
                "OPENIMIS_BASE_URL": info["base_url"],
                "OPENIMIS_FHIR_BASE_URL": info["fhir_base_url"],
                "OPENIMIS_PID": str(info["pid"]),
                "OPENIMIS_PORT": str(info["port"]),
                "OPENIMIS_DB_NAME": info["db_name"],
                "OPENIMIS_SERVER_LOG": info["server_log"],
            }
            if args.json:
                print(json.dumps(env, indent=2))
            else:
                for k, v in env.items():
                    print(f"export {k}={v}")
            return 0
    except HarnessError as exc:
        print(f"[openimis-harness] ERROR: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(_main())
