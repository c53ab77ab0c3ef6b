"""Settings: defaults, one error per bad value naming its variable, and the cross checks."""

from __future__ import annotations

import ipaddress
from dataclasses import fields
from pathlib import Path

import pytest

from config import Settings, SettingsError, describe, load_setting, load_settings


def test_defaults_with_an_empty_environ() -> None:
    settings = load_settings({})

    data_dir = Path("notifier-data").resolve()
    assert settings.data_dir == data_dir
    assert settings.database_url == f"sqlite:///{data_dir}/notifier.db"
    assert settings.broker_url == f"redis+socket://{data_dir}/redis.sock"
    assert settings.redis_url == f"unix://{data_dir}/redis.sock"
    assert settings.uses_embedded_redis
    assert settings.http_timeout == (5.0, 30.0)
    assert settings.retry_horizon == 3 * 24 * 3600
    assert settings.allow_private_networks == ()
    assert settings.database_timeout == 3


def test_derived_urls_follow_the_data_dir(tmp_path: Path) -> None:
    settings = load_settings({"NOTIFIER_DATA_DIR": str(tmp_path)})

    assert settings.data_dir == tmp_path.resolve()
    assert settings.database_url == f"sqlite:///{tmp_path.resolve()}/notifier.db"
    assert settings.redis_url == f"unix://{tmp_path.resolve()}/redis.sock"


def test_values_are_parsed() -> None:
    settings = load_settings({
        "NOTIFIER_HTTP_READ_TIMEOUT": "12.5",
        "NOTIFIER_RETRY_SCHEDULE": "1, 2,,3",
        "NOTIFIER_ALLOW_PRIVATE_NETWORKS": "127.0.0.0/8, ::1/128",
        "NOTIFIER_REDIS_URL": "redis://cache.internal:6379/2",
    })

    assert settings.http_read_timeout == 12.5
    assert settings.retry_schedule == (1.0, 2.0, 3.0)
    assert settings.allow_private_networks == (
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert not settings.uses_embedded_redis


@pytest.mark.parametrize(("variable", "value"), [
    ("NOTIFIER_HTTP_READ_TIMEOUT", "abc"),
    ("NOTIFIER_HTTP_READ_TIMEOUT", "0"),
    ("NOTIFIER_HTTP_CONNECT_TIMEOUT", "-1"),
    ("NOTIFIER_MAX_RESPONSE_BYTES", "1.5"),
    ("NOTIFIER_RETRY_SCHEDULE", ""),
    ("NOTIFIER_RETRY_SCHEDULE", " , "),
    ("NOTIFIER_RETRY_SCHEDULE", "5,0"),
    ("NOTIFIER_RETRY_JITTER", "1"),
    ("NOTIFIER_RETRY_JITTER", "-0.1"),
    ("NOTIFIER_ALLOW_PRIVATE_NETWORKS", "notacidr"),
    ("NOTIFIER_ALLOW_PRIVATE_NETWORKS", "10.0.0.1/8"),
    ("NOTIFIER_DATABASE_URL", "   "),
    ("NOTIFIER_DATABASE_TIMEOUT", "1"),
    ("NOTIFIER_DATABASE_TIMEOUT", "2.5"),
    ("NOTIFIER_TASK_EVENTS", "maybe"),
])
def test_a_bad_value_names_its_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({variable: value})

    assert str(caught.value).startswith(f"{variable}=")


@pytest.mark.parametrize("variable", [
    "NOTIFIER_HTTP_READ_TIMEOUT", "NOTIFIER_VISIBILITY_TIMEOUT", "NOTIFIER_RETRY_SCHEDULE"])
def test_nan_is_refused(variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load_settings({variable: "nan"})


def test_one_setting_is_read_alone_as_load_settings_reads_it() -> None:
    # A producer reads the bound it needs without the worker's whole environment.
    assert load_setting("max_events_per_message", {}) == 1000
    assert load_setting("max_events_per_message",
                        {"NOTIFIER_MAX_EVENTS_PER_MESSAGE": "20", "NOTIFIER_NOPE": "x"}) == 20
    with pytest.raises(SettingsError, match="NOTIFIER_MAX_EVENTS_PER_MESSAGE='0'"):
        load_setting("max_events_per_message", {"NOTIFIER_MAX_EVENTS_PER_MESSAGE": "0"})


def test_an_unknown_variable_is_named() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"NOTIFIER_FOO": "1"})

    assert str(caught.value).startswith("NOTIFIER_FOO:")


def test_test_variables_and_other_prefixes_are_ignored() -> None:
    settings = load_settings({"NOTIFIER_TEST_REDIS_URL": "redis://x", "HOME": "/root"})

    assert settings.redis_url.startswith("unix://")


def test_lease_must_exceed_the_hard_time_limit_which_exceeds_the_longest_task() -> None:
    # Defaults: batch budget 5 + the whole-request deadline 30 = 35 seconds; the soft time
    # limit half a second more, the hard one another half second.
    defaults = load_settings({})
    assert (defaults.slot_lease_seconds > defaults.task_time_limit
            > defaults.task_soft_time_limit > defaults.longest_task_seconds
            > defaults.http_deadline)
    assert (defaults.task_soft_time_limit, defaults.task_time_limit) == (35.5, 36)
    for lease in ("35", "35.5", "36"):
        with pytest.raises(SettingsError) as caught:
            load_settings({"NOTIFIER_SLOT_LEASE_SECONDS": lease})
        assert str(caught.value).startswith(f"NOTIFIER_SLOT_LEASE_SECONDS={lease}:")
        assert "hard time limit" in str(caught.value)
    assert load_settings({"NOTIFIER_SLOT_LEASE_SECONDS": "36.5"}).slot_lease_seconds == 36.5


def test_lease_check_counts_the_request_deadline() -> None:
    with pytest.raises(SettingsError, match="NOTIFIER_SLOT_LEASE_SECONDS"):
        load_settings({"NOTIFIER_HTTP_DEADLINE": "115"})


def test_visibility_timeout_must_exceed_the_lease() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"NOTIFIER_VISIBILITY_TIMEOUT": "120"})

    assert str(caught.value).startswith("NOTIFIER_VISIBILITY_TIMEOUT=120:")
    assert load_settings({"NOTIFIER_VISIBILITY_TIMEOUT": "121"}).visibility_timeout == 121


def test_a_data_dir_too_long_for_the_embedded_socket_is_refused() -> None:
    long_dir = "/" + "d" * 120

    with pytest.raises(SettingsError, match=r"^NOTIFIER_DATA_DIR="):
        load_settings({"NOTIFIER_DATA_DIR": long_dir})
    # Only the embedded Redis needs the socket.
    settings = load_settings({"NOTIFIER_DATA_DIR": long_dir,
                              "NOTIFIER_REDIS_URL": "redis://127.0.0.1:6379"})
    assert settings.data_dir == Path(long_dir)


def test_describe_lists_every_variable() -> None:
    text = describe()

    for field in fields(Settings):
        assert f"NOTIFIER_{field.name.upper()}  default " in text


def test_flower_listens_on_loopback_unless_configured_and_then_asks_for_credentials() -> None:
    assert load_settings({}).flower_address == "127.0.0.1"
    assert load_settings({}).flower_basic_auth == ()
    with pytest.raises(SettingsError, match=r"NOTIFIER_FLOWER_ADDRESS=0\.0\.0\.0: .*BASIC_AUTH"):
        load_settings({"NOTIFIER_FLOWER_ADDRESS": "0.0.0.0"})
    opened = load_settings({"NOTIFIER_FLOWER_ADDRESS": "0.0.0.0",
                            "NOTIFIER_FLOWER_BASIC_AUTH": "ops:one, audit:two"})
    assert opened.flower_basic_auth == ("ops:one", "audit:two")


def test_a_bad_secret_setting_is_named_without_its_value() -> None:
    with pytest.raises(SettingsError, match="NOTIFIER_FLOWER_BASIC_AUTH") as caught:
        load_settings({"NOTIFIER_FLOWER_BASIC_AUTH": "no-colon-s3cret"})
    assert "s3cret" not in str(caught.value)
    with pytest.raises(SettingsError, match="NOTIFIER_SECRET_KEYS") as caught:
        load_settings({"NOTIFIER_SECRET_KEYS": "not-a-fernet-s3cret"})
    assert "s3cret" not in str(caught.value)


def test_ui_session_lifetimes() -> None:
    settings = load_settings({"NOTIFIER_UI_SESSION_IDLE_SECONDS": "600"})
    assert (settings.ui_session_idle_seconds, settings.ui_session_max_seconds) == (600, 86400)


@pytest.mark.parametrize(("value", "on"), [("on", True), ("1", True), ("Yes", True),
                                           ("off", False), ("0", False), ("false", False)])
def test_task_events_are_a_switch(value: str, on: bool) -> None:
    assert load_settings({}).task_events is True
    assert load_settings({"NOTIFIER_TASK_EVENTS": value}).task_events is on
