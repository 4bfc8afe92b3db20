import base64
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


def test_isolation_limits_have_defaults_and_refuse_what_would_disable_a_route(monkeypatch):
    settings = Settings()
    assert settings.test_deliveries_per_org == 5
    assert settings.test_delivery_threads == 20
    assert settings.sse_streams_per_key == 5
    assert settings.sse_stream_max_seconds == 3600
    monkeypatch.setenv("ROTATOR_TEST_DELIVERIES_PER_ORG", "12")
    assert Settings().test_deliveries_per_org == 12
    for name in ("test_deliveries_per_org", "test_delivery_threads", "sse_streams_per_key"):
        with pytest.raises(ValidationError, match=name):
            Settings.model_validate({name: 0})
    with pytest.raises(ValidationError, match="sse_stream_max_seconds"):
        Settings(sse_stream_max_seconds=0)
