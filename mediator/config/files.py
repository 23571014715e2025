"""The files a configuration names, read as the running mediator will read them: TLS certificate, key and
client CA (channels.yaml `server.listen.tls`), clients' public keys and JWKS files and the token service's
signing key (policies/clients.yaml).

`load_config` validates the documents only (policy tests and explain run offline on a fresh clone, before
`make certs`); `load_runnable_config` also reads these files, so `serve`, a hot reload and `check` refuse a
missing, unreadable or wrong key file at the line that names it, instead of a traceback at start or a
reload that fails half-way. Nothing is written: an absent signing key is made at start (mediator.identity).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path

from mediator.config import Config, load_config
from mediator.config.clients import ClientsPolicy, KeySource
from mediator.config.yaml_source import SourcedDocument
from mediator.errors import ConfigError, ConfigProblem


def load_runnable_config(root: Path | str) -> Config:
    """`load_config`, then every file it names read; ConfigError lists every problem of both."""
    config = load_config(root)
    problems = referenced_file_problems(config)
    if problems:
        raise ConfigError(problems)
    return config


def referenced_file_problems(config: Config) -> list[ConfigProblem]:
    return [*_tls_problems(config), *_key_problems(config)]


def _problem(config: Config, key: str, file: str, path: Sequence[str | int], message: str) -> ConfigProblem:
    source: SourcedDocument | None = config.sources.get(key)
    if source is None:
        return ConfigProblem(file, 1, 1, message)
    return source.problem(path, message)


def _tls_problems(config: Config) -> list[ConfigProblem]:
    from mediator.tls import server_context

    tls = config.channels.server.listen.tls
    if tls is None:
        return []
    problems = []
    for name in ("cert_file", "key_file", "client_ca_file"):
        value = getattr(tls, name)
        if value is not None and not (config.root / value).is_file():
            problems.append(_problem(config, "channels", "channels.yaml", ("server", "listen", "tls", name),
                                     f"{value}: no such file"))
    if problems:
        return problems
    try:
        server_context(tls, config.root)
    except (ssl.SSLError, OSError, ValueError) as exc:
        problems.append(_problem(config, "channels", "channels.yaml", ("server", "listen", "tls"),
                                 f"the certificate, key or client CA cannot be loaded ({exc})"))
    return problems


def _key_problems(config: Config) -> list[ConfigProblem]:
    from mediator.identity.keys import KeyFileError, check_signing_key, load_jwks_file, load_public_key_file

    policy = config.policies.get("clients")
    if not isinstance(policy, ClientsPolicy):
        return []
    problems = []

    def check(source: KeySource | None, path: tuple[str | int, ...]) -> None:
        if source is None:
            return
        field, named = ("public_key_file", source.public_key_file) if source.public_key_file is not None else \
            ("jwks_file", source.jwks_file)
        if named is None:
            return   # a jwks_url: fetched at start, and its last good keys kept when it is down
        try:
            if field == "public_key_file":
                load_public_key_file(config.root / named)
            else:
                load_jwks_file(config.root / named)
        except KeyFileError as exc:
            problems.append(_problem(config, "clients", "policies/clients.yaml", (*path, field),
                                     _as_configured(exc, config.root / named, named)))

    for client_id, entry in policy.clients.items():
        check(entry.keys, ("clients", client_id, "keys"))
        check(entry.user_token.keys if entry.user_token is not None else None,
              ("clients", client_id, "user_token", "keys"))
    signing = policy.token_service.signing_key_file
    try:
        check_signing_key(config.root / signing)
    except KeyFileError as exc:
        problems.append(_problem(config, "clients", "policies/clients.yaml", ("token_service", "signing_key_file"),
                                 _as_configured(exc, config.root / signing, signing)))
    return problems


def _as_configured(exc: Exception, path: Path, named: str) -> str:
    """The error with the file as the configuration names it (relative to the config directory)."""
    return str(exc).replace(str(path), named, 1)
