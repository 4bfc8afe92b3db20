"""``rotator``: the one command-line entry point (docs/operating.md, "Command line")."""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rotator.settings import ConfigurationError, generate_key, get_settings

if TYPE_CHECKING:
    from models.db import Database
    from models.org import IssuedKey


def _database() -> Database:
    from models.db import get_database

    return get_database()


def cmd_dev(args: argparse.Namespace) -> int:
    os.environ.setdefault("ROTATOR_ALLOW_INSECURE_URLS", "true")
    os.environ.setdefault("ROTATOR_BROKER_URL", "memory://localhost/")
    get_settings.cache_clear()
    settings = get_settings()
    if not settings.broker_url.startswith("memory://"):
        print("rotator dev runs on the in-memory broker; unset ROTATOR_BROKER_URL", file=sys.stderr)
        return 2
    import uvicorn

    from rotator.embedded import background_services
    from rotator.logs import configure_logging, logging_config

    configure_logging(settings)
    db = _database()
    db.create_schema()
    with background_services(settings):
        uvicorn.run(
            "api.app:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            log_level=settings.log_level.lower(),
            log_config=logging_config(settings),
            access_log=False,
        )
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from rotator.logs import configure_logging, logging_config

    settings = get_settings()
    configure_logging(settings)
    _database()  # refuse to start on bad settings before binding the port
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=settings.log_level.lower(),
        # Applied in every uvicorn worker process too; the middleware logs each request.
        log_config=logging_config(settings),
        access_log=False,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from rotator.logs import configure_logging
    from workers.app import app

    configure_logging(get_settings())
    _database()
    app.worker_main(["worker", *args.celery_args])
    return 0


def cmd_beat(args: argparse.Namespace) -> int:
    from rotator.logs import configure_logging
    from workers.app import app

    configure_logging(get_settings())
    _database()
    app.start(["beat", *args.celery_args])
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    _database().create_schema()
    print("database is at the newest migration")
    return 0


def _print_key(issued: IssuedKey) -> None:
    print(
        json.dumps(
            {
                "org_id": str(issued.org_id),
                "key_id": str(issued.key_id),
                "api_key": issued.api_key,
                "scopes": issued.scopes,
            }
        )
    )


def _scopes(raw: str | None) -> list[str]:
    return raw.split(",") if raw else []


def cmd_orgs_create(args: argparse.Namespace) -> int:
    from models.org import create_org, issue_key

    with _database().session() as session:
        org = create_org(session, args.name)
        issued = issue_key(session, org.id, _scopes(args.scopes))
    _print_key(issued)
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from models.org import issue_key

    with _database().session() as session:
        issued = issue_key(session, args.org, _scopes(args.scopes))
    _print_key(issued)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from models.org import revoke_key

    with _database().session() as session:
        key = revoke_key(session, args.key_id)
        print(json.dumps({"key_id": str(key.id), "revoked": True}))
    return 0


def cmd_ops_list(args: argparse.Namespace) -> int:
    from rotator.opsview import list_operations

    return list_operations(_database(), sys.stdout, org_id=args.org, state=args.state)


def cmd_ops_watch(args: argparse.Namespace) -> int:
    from rotator.opsview import watch

    return watch(_database(), args.operation_id)


def cmd_secrets_genkey(args: argparse.Namespace) -> int:
    print(generate_key())
    return 0


def cmd_secrets_reencrypt(args: argparse.Namespace) -> int:
    from models.rekey import reencrypt_all

    with _database().session() as session:
        counts = reencrypt_all(session)
    print(json.dumps(counts))
    return 0


def _receiver_secrets(values: list[str], path: str | None, variable: str, flag: str) -> list[str]:
    """Secrets from ``flag`` (repeatable), else ``flag``-file (one per line), else the
    comma-separated environment ``variable``: arguments are visible to every user of the
    machine (ps), a file or the environment are not. Errors never echo a secret."""
    if values and path:
        raise ValueError(f"give {flag} or {flag}-file, not both")
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not text"
            raise ValueError(f"cannot read {flag}-file {path}: {reason}") from None
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if values:
        return values
    return [item.strip() for item in os.environ.get(variable, "").split(",") if item.strip()]


def cmd_receiver(args: argparse.Namespace) -> int:
    from receiver.server import DemoReceiver, run

    try:
        secrets = _receiver_secrets(
            args.secret, args.secret_file, "ROTATOR_RECEIVER_SECRETS", "--secret"
        )
        if not secrets:
            raise ValueError(
                "no endpoint secret: give --secret, --secret-file or ROTATOR_RECEIVER_SECRETS"
            )
        org_secrets = _receiver_secrets(
            args.org_secret, args.org_secret_file, "ROTATOR_RECEIVER_ORG_SECRETS", "--org-secret"
        )
        demo = DemoReceiver(secrets, org_secrets=org_secrets, tolerance_s=args.tolerance)
    except ValueError as exc:  # the message never echoes the secret
        print(f"rotator: {exc}", file=sys.stderr)
        return 2
    try:
        return run(demo, args.host, args.port)
    except OSError as exc:  # e.g. the port is taken
        print(f"rotator: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rotator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    dev = commands.add_parser("dev", help="API + worker + beat in one process (SQLite, memory)")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8000)
    dev.set_defaults(func=cmd_dev)

    api = commands.add_parser("api", help="serve the HTTP API with uvicorn")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1)
    api.set_defaults(func=cmd_api)

    for name, func in (("worker", cmd_worker), ("beat", cmd_beat)):
        sub = commands.add_parser(
            name, help=f"run a Celery {name}; other options go to Celery", add_help=False
        )
        sub.set_defaults(func=func, passthrough=True)

    db = commands.add_parser("db", help="database schema").add_subparsers(dest="db", required=True)
    db.add_parser("upgrade", help="apply migrations up to the newest").set_defaults(
        func=cmd_db_upgrade
    )

    orgs = commands.add_parser("orgs").add_subparsers(dest="orgs", required=True)
    org_create = orgs.add_parser("create", help="create an organization and its first key")
    org_create.add_argument("--name", required=True)
    org_create.add_argument("--scopes", help="comma separated (default: all)")
    org_create.set_defaults(func=cmd_orgs_create)

    keys = commands.add_parser("keys").add_subparsers(dest="keys", required=True)
    key_create = keys.add_parser("create", help="issue an API key")
    key_create.add_argument("--org", type=uuid.UUID, required=True)
    key_create.add_argument("--scopes", help="comma separated (default: all)")
    key_create.set_defaults(func=cmd_keys_create)
    key_revoke = keys.add_parser("revoke", help="revoke an API key")
    key_revoke.add_argument("key_id", type=uuid.UUID)
    key_revoke.set_defaults(func=cmd_keys_revoke)

    ops = commands.add_parser("ops", help="operators' view of operations").add_subparsers(
        dest="ops", required=True
    )
    ops_list = ops.add_parser("list", help="recent operations, newest first")
    ops_list.add_argument("--org", type=uuid.UUID)
    ops_list.add_argument("--state")
    ops_list.set_defaults(func=cmd_ops_list)
    ops_watch = ops.add_parser(
        "watch", help="live view of one operation; exit 0 when it succeeded, 1 otherwise"
    )
    ops_watch.add_argument("operation_id", type=uuid.UUID)
    ops_watch.set_defaults(func=cmd_ops_watch)

    sec = commands.add_parser("secrets").add_subparsers(dest="secrets", required=True)
    sec.add_parser("genkey", help="print a new at-rest encryption key").set_defaults(
        func=cmd_secrets_genkey
    )
    sec.add_parser(
        "reencrypt", help="re-encrypt every stored secret under the first ROTATOR_ENCRYPTION_KEYS"
    ).set_defaults(func=cmd_secrets_reencrypt)

    rec = commands.add_parser("receiver", help="run the demo webhook receiver")
    rec.add_argument("--host", default="127.0.0.1")
    rec.add_argument("--port", type=int, default=9000)
    # Secrets in arguments are visible to every user of the machine: prefer a file or the
    # environment (ROTATOR_RECEIVER_SECRETS, ROTATOR_RECEIVER_ORG_SECRETS; comma separated).
    rec.add_argument(
        "--secret", action="append", default=[], help="endpoint secret (base64), newest first"
    )
    rec.add_argument("--secret-file", help="endpoint secrets, one per line, newest first")
    rec.add_argument(
        "--org-secret", action="append", default=[], help="org secret: also check the org signature"
    )
    rec.add_argument("--org-secret-file", help="org secrets, one per line")
    rec.add_argument("--tolerance", type=int, default=300, help="max timestamp age in seconds")
    rec.set_defaults(func=cmd_receiver)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line; ``worker`` and ``beat`` hand every other option to Celery."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        args.celery_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from models.errors import DomainError

    args = parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigurationError as exc:
        # One line per problem and no traceback: the variable and what is wrong, not its value.
        for line in exc.lines():
            print(f"rotator: configuration error: {line}", file=sys.stderr)
        return 2
    except DomainError as exc:
        detail = f" ({json.dumps(exc.details)})" if exc.details else ""
        print(f"rotator: {exc.message}{detail}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    raise SystemExit(main())
