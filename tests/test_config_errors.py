"""A bad setting stops every command with one line per problem: the variable and what is wrong,
never its value and never a traceback (the real ``rotator`` and ``celery`` commands, run as
processes)."""

from __future__ import annotations

import base64
import subprocess
import uuid

from tests.processes import BIN, rotator_env

# Most of a valid key, then a malformed second key: nothing of either may reach the output.
VALID_PART = base64.b64encode(bytes(range(100, 132))).decode()
BAD_KEYS = f"{VALID_PART},{VALID_PART[:20]}!!"

COMMANDS = [
    ["rotator", "api", "--port", "1"],
    ["rotator", "worker", "--loglevel=INFO"],
    ["rotator", "beat"],
    ["rotator", "dev", "--port", "1"],
    ["rotator", "db", "upgrade"],
    ["rotator", "orgs", "create", "--name", "Acme"],
    ["rotator", "keys", "create", "--org", str(uuid.uuid4())],
    ["rotator", "keys", "revoke", str(uuid.uuid4())],
    ["rotator", "secrets", "reencrypt"],
    ["rotator", "ops", "list"],
    ["rotator", "ops", "watch", str(uuid.uuid4())],
    ["celery", "-A", "workers", "worker"],
    ["celery", "-A", "workers", "beat"],
    ["celery", "-A", "workers", "inspect", "ping"],
]


def _run_all(commands: list[list[str]], env: dict[str, str], cwd) -> list[tuple[int, str, str]]:
    procs = [
        subprocess.Popen(
            [str(BIN / command[0]), *command[1:]],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results.append((proc.returncode, out, err))
    return results


def _assert_one_clean_line(result: tuple[int, str, str], variable: str, *values: str) -> str:
    code, out, err = result
    assert code != 0, (out, err)
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"rotator: configuration error: {variable}"), err
    for value in values:
        # Not the value, nor any 8-character piece of it.
        for start in range(0, max(1, len(value) - 7)):
            assert value[start : start + 8] not in err + out, (value, err)
    return lines[0]


def test_a_malformed_encryption_key_stops_every_command_with_one_line(tmp_path):
    env = rotator_env(
        ROTATOR_ENCRYPTION_KEYS=BAD_KEYS,
        ROTATOR_DATA_DIR=str(tmp_path),
        ROTATOR_DATABASE_URL=f"sqlite:///{tmp_path / 'r.db'}",
    )
    results = _run_all(COMMANDS, env, tmp_path)
    for command, result in zip(COMMANDS, results, strict=True):
        line = _assert_one_clean_line(result, "ROTATOR_ENCRYPTION_KEYS", VALID_PART)
        assert "key #2 is not standard base64" in line, command
    assert not (tmp_path / "r.db").exists()  # nothing started, nothing created


BAD_SETTINGS = [
    ("ROTATOR_DATABASE_URL", "mysql://admin:s3cret-passw0rd@db/rotator", "sqlite:///"),
    ("ROTATOR_DATABASE_URL", "postgresql://admin:s3cret-passw0rd@db:port/x", "well-formed"),
    ("ROTATOR_BROKER_URL", "amqp://guest:s3cret-passw0rd@mq//", "redis://"),
    ("ROTATOR_LOG_LEVEL", "VERBOSE-LOGGING", "DEBUG"),
    ("ROTATOR_ENDPOINT_LIMIT", "fifty-endpoints", "valid integer"),
    ("ROTATOR_DELIVERY_RETRY_SCHEDULE", "5,soon-enough", "item 2"),
    ("ROTATOR_ENV", "staging-environment", "production"),
    ("ROTATOR_METRICS_TOKEN", "short tok", "16"),
    ("ROTATOR_DOCS", "sometimes-maybe", "'on'"),
]


def test_each_bad_setting_is_named_without_its_value(tmp_path):
    procs = [
        subprocess.Popen(
            [str(BIN / "rotator"), "db", "upgrade"],
            env=rotator_env(ROTATOR_DATA_DIR=str(tmp_path), **{variable: value}),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for variable, value, _ in BAD_SETTINGS
    ]
    for proc, (variable, value, what) in zip(procs, BAD_SETTINGS, strict=True):
        out, err = proc.communicate(timeout=60)
        line = _assert_one_clean_line((proc.returncode, out, err), variable, value)
        assert what in line


def test_production_without_a_key_is_one_line_for_the_worker_too(tmp_path):
    env = rotator_env(
        ROTATOR_ENV="production",
        ROTATOR_DATA_DIR=str(tmp_path),
        ROTATOR_DATABASE_URL=f"sqlite:///{tmp_path / 'r.db'}",
    )
    for result in _run_all([["rotator", "worker"], ["rotator", "db", "upgrade"]], env, tmp_path):
        line = _assert_one_clean_line(result, "ROTATOR_ENCRYPTION_KEYS")
        assert "required in production" in line


def test_the_demo_receiver_refuses_a_bad_secret_in_one_line(tmp_path):
    bad = f"{VALID_PART[:40]}!!!!"
    results = _run_all(
        [
            ["rotator", "receiver", "--port", "1", "--secret", bad],
            ["rotator", "receiver", "--port", "1", "--secret", VALID_PART, "--org-secret", bad],
        ],
        rotator_env(),
        tmp_path,
    )
    for code, out, err in results:
        assert code == 2
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
        assert "base64" in err
        assert VALID_PART[:8] not in err + out
