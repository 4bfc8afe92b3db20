"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

The files are parsed (YAML, and the Dockerfile's instructions) and their structure asserted:
the services docs/operating.md ("Running Rotator") names, health checks, start-up order, one
beat, no literal secrets, and commands that the ``rotator`` command line really accepts.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from rotator.cli import parse_args

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

WORKERS = ("worker-control", "worker-deliveries")
EXPECTED_SERVICES = {"postgres", "redis", "migrate", "api", *WORKERS, "beat", "flower"}
ONE_SHOT = {"migrate"}
CONDITIONS = {"service_healthy", "service_completed_successfully", "service_started"}
# The subcommands compose runs, and the ``func`` the parser must pick for each.
EXPECTED_COMMANDS = {
    "migrate": (["db", "upgrade"], "cmd_db_upgrade"),
    "api": (["api", "--host", "0.0.0.0", "--port", "8000"], "cmd_api"),  # noqa: S104
    # One worker service per plane (docs/operating.md, "Isolation").
    "worker-control": (
        ["worker", "--loglevel=INFO", "--concurrency=2", "-Q", "control"],
        "cmd_worker",
    ),
    "worker-deliveries": (
        ["worker", "--loglevel=INFO", "--concurrency=2", "-Q", "deliveries"],
        "cmd_worker",
    ),
    "beat": (["beat", "--loglevel=INFO"], "cmd_beat"),
}


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


def _services() -> dict[str, dict[str, Any]]:
    services = _compose().get("services")
    assert isinstance(services, dict), "docker-compose.yml has no services mapping"
    return services


def _tokens(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    assert isinstance(value, list), f"expected a list or a string, got {value!r}"
    return [str(item) for item in value]


def _is_project_image(service: dict[str, Any]) -> bool:
    return "build" in service


def _long_running(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if name not in ONE_SHOT}


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [index for index, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert starts, "Dockerfile has no FROM"
    return instructions[starts[-1] :]


def test_compose_file_uses_the_compose_spec_without_a_version_key() -> None:
    data = _compose()
    assert "version" not in data, "the Compose spec has no top-level version: key"
    assert "x-rotator-env" in data


def test_every_expected_service_exists() -> None:
    missing = EXPECTED_SERVICES - set(_services())
    assert not missing, f"services missing from docker-compose.yml: {sorted(missing)}"


def test_project_services_share_the_rotator_environment() -> None:
    data = _compose()
    shared = data["x-rotator-env"]
    assert shared["ROTATOR_ENV"] == "production"
    assert shared["ROTATOR_DATABASE_URL"] == "postgresql://rotator:rotator@postgres:5432/rotator"
    assert shared["ROTATOR_BROKER_URL"] == "redis://redis:6379/0"
    for name in ("migrate", "api", *WORKERS, "beat"):
        service = data["services"][name]
        assert _is_project_image(service), f"{name} does not run the project image"
        assert service.get("environment") == shared, f"{name} does not use x-rotator-env"


def test_services_reach_postgres_and_redis_by_service_name() -> None:
    data = _compose()
    services = data["services"]
    database_host = re.search(r"@([^:/]+)", data["x-rotator-env"]["ROTATOR_DATABASE_URL"])
    assert database_host is not None
    assert database_host.group(1) in services
    broker = data["x-rotator-env"]["ROTATOR_BROKER_URL"]
    assert broker.split("//", 1)[1].split(":", 1)[0] in services
    assert services["flower"]["environment"]["CELERY_BROKER_URL"] == broker, (
        "Flower must watch the broker the workers use"
    )


def test_exactly_one_service_runs_beat() -> None:
    services = _services()
    beats = [
        name
        for name, service in services.items()
        if "beat" in _tokens(service.get("entrypoint")) + _tokens(service.get("command"))
    ]
    assert beats == ["beat"], f"services running beat: {beats}"
    beat = services["beat"]
    assert beat.get("deploy", {}).get("replicas", 1) == 1
    assert "scale" not in beat


def test_long_running_services_have_healthchecks_and_restart() -> None:
    services = _services()
    long_running = _long_running(services)
    assert {"postgres", "redis", "api", *WORKERS, "flower", "beat"} <= set(long_running)
    for name, service in long_running.items():
        check = service.get("healthcheck")
        assert isinstance(check, dict), f"{name} has no healthcheck"
        assert not check.get("disable", False), f"{name} disables its healthcheck"
        test = check.get("test")
        assert isinstance(test, list), f"{name}: healthcheck test should be a list"
        assert test[0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck test is {test!r}"
        assert len(test) > 1, f"{name}: empty healthcheck command"
        assert service.get("restart") == "unless-stopped", f"{name} restart policy"


def test_healthchecks_probe_the_right_thing() -> None:
    services = _services()
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"][1:] == ["redis-cli", "ping"]
    api_check = " ".join(services["api"]["healthcheck"]["test"])
    assert "/readyz" in api_check
    assert "urllib" in api_check, "python:3.11-slim has no curl; probe with python's urllib"
    assert "curl" not in api_check
    assert "8000" in api_check


def test_redis_persists_with_appendonly() -> None:
    command = _tokens(_services()["redis"].get("command"))
    assert "--appendonly" in command, "redis must run with --appendonly yes"
    assert command[command.index("--appendonly") + 1] == "yes"


def test_stateful_services_use_named_volumes() -> None:
    data = _compose()
    declared = set(data.get("volumes") or {})
    for name, target in (("postgres", "/var/lib/postgresql/data"), ("redis", "/data")):
        mounts = [str(volume).split(":") for volume in data["services"][name].get("volumes", [])]
        sources = [source for source, mount, *_ in mounts if mount == target]
        assert sources, f"{name} does not mount a volume at {target}"
        assert sources[0] in declared, f"{name}'s volume {sources[0]!r} is not a named volume"


def test_every_dependency_has_a_condition_on_an_existing_service() -> None:
    services = _services()
    for name, service in services.items():
        depends_on = service.get("depends_on")
        if depends_on is None:
            continue
        assert isinstance(depends_on, dict), (
            f"{name}: the short depends_on list form has no condition"
        )
        for dependency, spec in depends_on.items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            assert dependency != name
            condition = (spec or {}).get("condition")
            assert condition in CONDITIONS, f"{name} -> {dependency}: condition {condition!r}"
            if dependency in ONE_SHOT:
                assert condition == "service_completed_successfully", (name, dependency)
            else:
                assert condition == "service_healthy", (name, dependency)
                assert "healthcheck" in services[dependency], (
                    f"{name} waits for {dependency} to be healthy but it has no healthcheck"
                )


def test_api_worker_beat_and_flower_wait_for_redis() -> None:
    services = _services()
    for name in ("api", *WORKERS, "beat", "flower"):
        condition = services[name].get("depends_on", {}).get("redis", {}).get("condition")
        assert condition == "service_healthy", f"{name} does not wait for a healthy redis"


def test_migrate_is_one_shot_and_everything_on_the_database_waits_for_it() -> None:
    services = _services()
    migrate = services["migrate"]
    assert _tokens(migrate.get("command")) == ["db", "upgrade"]
    assert migrate.get("restart") == "no", "migrate must not restart after it exits"
    assert "ports" not in migrate
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"

    on_database = [
        name
        for name, service in services.items()
        if name != "migrate" and "ROTATOR_DATABASE_URL" in (service.get("environment") or {})
    ]
    assert {"api", *WORKERS, "beat"} <= set(on_database)
    for name in on_database:
        condition = services[name].get("depends_on", {}).get("migrate", {}).get("condition")
        assert condition == "service_completed_successfully", (
            f"{name} uses the database but does not wait for migrate"
        )


def test_ports_and_flower_image() -> None:
    services = _services()
    assert "8000:8000" in [str(port) for port in services["api"].get("ports", [])]
    assert "5555:5555" in [str(port) for port in services["flower"].get("ports", [])]
    assert services["flower"]["image"] == "mher/flower:2.0"
    for name in ("postgres", "redis"):
        assert "ports" not in services[name], f"{name} should not be published"


def _looks_like_key(token: str) -> bool:
    try:
        return len(base64.b64decode(token, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def test_no_literal_secrets() -> None:
    data = _compose()
    keys = data["x-rotator-env"]["ROTATOR_ENCRYPTION_KEYS"]
    assert re.fullmatch(r"\$\{ROTATOR_ENCRYPTION_KEYS:\?[^}]+\}", keys), (
        f"ROTATOR_ENCRYPTION_KEYS must be a required ${{...:?...}} variable, not {keys!r}"
    )
    auth = data["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"]
    # user:password, each a variable; the password one is required (no default).
    assert re.fullmatch(r"\$\{[A-Z_]+(:-[^}]*)?\}:\$\{ROTATOR_FLOWER_PASSWORD:\?[^}]+\}", auth), (
        f"Flower's user and password must come from variables, the password a required "
        f"${{...:?...}} one, not {auth!r}"
    )
    for name, service in data["services"].items():
        environment = service.get("environment") or {}
        assert isinstance(environment, dict), f"{name}: use the mapping form of environment"
        for variable, value in environment.items():
            if re.search(r"KEY|SECRET|TOKEN", variable):
                assert str(value).startswith("${"), f"{name}: {variable} is a literal value"
    candidates = re.findall(r"[A-Za-z0-9+/]{43}=", COMPOSE_FILE.read_text())
    assert not [token for token in candidates if _looks_like_key(token)], (
        "docker-compose.yml contains what looks like an encryption key"
    )


def test_dockerfile_builds_a_small_non_root_image_running_rotator() -> None:
    instructions = _dockerfile_instructions()
    final = _final_stage(instructions)
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert all(rest.split()[0] == "python:3.11-slim" for rest in froms), froms

    entrypoints = [rest for keyword, rest in final if keyword == "ENTRYPOINT"]
    assert entrypoints, "the final stage has no ENTRYPOINT"
    assert json.loads(entrypoints[-1]) == ["rotator"]

    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, "the final stage runs as root"
    assert users[-1].split(":")[0] not in ("root", "0")

    env = " ".join(rest for keyword, rest in final if keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PYTHONUNBUFFERED=1" in env

    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert re.search(r"pip install (--\S+ )*\.(\s|$)", runs), "the image must `pip install .`"
    assert "--no-cache-dir" in runs
    assert "[dev]" not in runs, "no dev extras in the image"


def test_console_script_backs_the_entrypoint() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["rotator"] == "rotator.cli:main"


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    entries = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".git", ".venv", ".rotator", "**/__pycache__", ".pytest_cache", ".env"):
        assert required in entries, f".dockerignore does not exclude {required}"


def test_compose_commands_are_real_rotator_subcommands() -> None:
    services = _services()
    problems = []
    for name, (expected, func_name) in EXPECTED_COMMANDS.items():
        command = _tokens(services[name].get("command"))
        assert command == expected, f"{name} runs {command!r}, expected {expected!r}"
        try:
            args = parse_args(command)
        except SystemExit:
            problems.append(f"`rotator {' '.join(command)}` (service {name}) is rejected")
            continue
        if args.func.__name__ != func_name:
            problems.append(f"{name}: parsed to {args.func.__name__}, not {func_name}")
        if name in (*WORKERS, "beat") and args.celery_args != command[1:]:
            problems.append(f"{name}: Celery would get {args.celery_args!r}, not {command[1:]!r}")
    assert not problems, "rotator's parser does not accept compose's commands:\n" + "\n".join(
        problems
    )


def test_the_two_planes_consume_every_queue_between_them() -> None:
    from workers.app import app

    consumed = []
    for name in WORKERS:
        command = _tokens(_services()[name].get("command"))
        consumed.append(command[command.index("-Q") + 1])
    assert sorted(consumed) == sorted(queue.name for queue in app.conf.task_queues)
