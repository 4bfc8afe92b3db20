import base64
import ipaddress
import stat

import pytest
from pydantic import ValidationError

from rotator.settings import ConfigurationError, Settings, generate_key


def test_production_refuses_to_start_without_an_encryption_key(tmp_path):
    settings = Settings(env="production", data_dir=tmp_path, encryption_keys=[])
    with pytest.raises(ConfigurationError, match="ROTATOR_ENCRYPTION_KEYS"):
        settings.encryption_key_bytes()
    assert not (tmp_path / "encryption.key").exists()


def test_development_keeps_a_local_key_file_and_warns(tmp_path, caplog):
    settings = Settings(env="development", data_dir=tmp_path, encryption_keys=[])
    with caplog.at_level("WARNING", logger="rotator.settings"):
        first = settings.encryption_key_bytes()
    key_file = tmp_path / "encryption.key"
    assert len(first[0]) == 32
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert "generated a local at-rest key" in caplog.text
    # The same key comes back on the next start, so the local database stays readable.
    again = Settings(env="development", data_dir=tmp_path, encryption_keys=[])
    assert again.encryption_key_bytes() == first


def test_configured_keys_come_first_in_order():
    old, new = generate_key(), generate_key()
    settings = Settings(encryption_keys=f"{new}, {old}")
    assert settings.encryption_key_bytes() == [base64.b64decode(new), base64.b64decode(old)]


@pytest.mark.parametrize(
    "bad",
    ["not base64!", base64.b64encode(b"short").decode(), base64.b64encode(bytes(33)).decode()],
)
def test_malformed_keys_are_refused(bad):
    with pytest.raises(ValidationError, match="encryption key #1"):
        Settings(encryption_keys=[bad])


def test_database_defaults_to_a_sqlite_file_in_the_data_dir(tmp_path):
    settings = Settings(data_dir=tmp_path, database_url="")
    assert settings.database_url == f"sqlite:///{tmp_path / 'rotator.db'}"
    assert settings.is_sqlite


def test_the_production_cli_refuses_to_start_without_a_key(tmp_path, monkeypatch, capsys):
    from rotator import cli
    from rotator.settings import get_settings

    monkeypatch.setenv("ROTATOR_ENV", "production")
    monkeypatch.setenv("ROTATOR_ENCRYPTION_KEYS", "")
    monkeypatch.setenv("ROTATOR_DATABASE_URL", f"sqlite:///{tmp_path / 'p.db'}")
    get_settings.cache_clear()
    from models import db as db_module

    saved = db_module._database
    db_module.set_database(None)
    try:
        assert cli.main(["db", "upgrade"]) == 2
    finally:
        db_module.set_database(saved)
        get_settings.cache_clear()
    assert "ROTATOR_ENCRYPTION_KEYS is required in production" in capsys.readouterr().err
    assert not (tmp_path / "p.db").exists()


def test_allowed_private_networks_from_csv():
    settings = Settings(allowed_private_networks=" 10.0.0.0/8,fd00::/8 ,, 192.168.7.9 ")
    assert settings.allowed_private_networks == [
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("192.168.7.9/32"),  # a bare address is a one-address network
    ]
    assert Settings().allowed_private_networks == []


def test_allowed_private_networks_from_the_environment(monkeypatch):
    monkeypatch.setenv("ROTATOR_ALLOWED_PRIVATE_NETWORKS", "172.16.0.0/12")
    assert Settings().allowed_private_networks == [ipaddress.ip_network("172.16.0.0/12")]


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ("10.0.0.0/33", "is not an IP network in CIDR notation"),
        ("intranet.example", "is not an IP network in CIDR notation"),
        ("10.0.0.0/8/8", "is not an IP network in CIDR notation"),
        ("10.1.2.3/8", "has host bits set"),
        ("fd00::1/8", "has host bits set"),
    ],
)
def test_invalid_allowed_private_networks_are_refused_by_name(monkeypatch, bad, problem):
    monkeypatch.setenv("ROTATOR_ALLOWED_PRIVATE_NETWORKS", f"192.168.0.0/16,{bad}")
    with pytest.raises(ValidationError) as refused:
        Settings()
    message = str(refused.value)
    assert f"ROTATOR_ALLOWED_PRIVATE_NETWORKS entry #2 {problem}" in message
    assert bad not in message  # the value is never repeated
    assert "192.168.0.0/16" not in message


def test_production_refuses_insecure_urls(monkeypatch, tmp_path):
    monkeypatch.setenv("ROTATOR_ENV", "production")
    monkeypatch.setenv("ROTATOR_ALLOW_INSECURE_URLS", "true")
    with pytest.raises(ValidationError) as refused:
        Settings(data_dir=tmp_path)
    message = str(refused.value)
    assert "ROTATOR_ALLOW_INSECURE_URLS=true is refused when ROTATOR_ENV=production" in message
    assert "ROTATOR_ALLOWED_PRIVATE_NETWORKS" in message
    # Production with private networks listed instead starts; so do the other environments.
    monkeypatch.setenv("ROTATOR_ALLOW_INSECURE_URLS", "false")
    monkeypatch.setenv("ROTATOR_ALLOWED_PRIVATE_NETWORKS", "10.0.0.0/8")
    assert Settings(data_dir=tmp_path).allowed_private_networks == [
        ipaddress.ip_network("10.0.0.0/8")
    ]
    for env in ("development", "test"):
        assert Settings(env=env, allow_insecure_urls=True).allow_insecure_urls


def test_isolation_limits_have_defaults_and_refuse_what_would_disable_a_route(monkeypatch):
    settings = Settings()
    assert settings.sync_tests_per_org == 5
    assert settings.sync_test_threads == 20
    assert settings.sse_streams_per_key == 5
    assert settings.sse_stream_max_seconds == 3600
    monkeypatch.setenv("ROTATOR_SYNC_TESTS_PER_ORG", "12")
    assert Settings().sync_tests_per_org == 12
    for name in ("sync_tests_per_org", "sync_test_threads", "sse_streams_per_key"):
        with pytest.raises(ValidationError, match=name):
            Settings.model_validate({name: 0})
    with pytest.raises(ValidationError, match="sse_stream_max_seconds"):
        Settings(sse_stream_max_seconds=0)
