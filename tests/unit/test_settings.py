"""Settings.from_env: every EAT_* variable parsed, every bad value named."""

from __future__ import annotations

import dataclasses

import pytest

from app.settings import Settings, SettingsError

FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
VARIABLES = {"EAT_" + name.upper(): name for name in FIELDS}


def refused(environ: dict[str, str], **overrides: object) -> SettingsError:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(environ, **overrides)
    return info.value


def test_empty_environment_gives_the_documented_defaults():
    settings = Settings.from_env({})
    assert settings == Settings()
    for name, f in FIELDS.items():
        assert getattr(settings, name) == f.default
    assert settings.redis_url.startswith("redis://")
    assert settings.prefix == "eat"


def test_defaults_are_valid_and_consistent():
    Settings().validate()
    assert Settings().retry_max >= Settings().retry_base


def test_empty_variable_means_default():
    assert Settings.from_env({"EAT_PREFIX": "", "EAT_MAX_DELIVERIES": ""}) == Settings()


def test_unrelated_variables_are_ignored():
    assert Settings.from_env({"PREFIX": "x", "EAT_NOT_A_SETTING": "1", "HOME": "/"}) == Settings()


GOOD_VALUES = {
    "EAT_REDIS_URL": ("rediss://redis.example:6380/2", "rediss://redis.example:6380/2"),
    "EAT_ZK_HOSTS": ("zk1:2181, zk2:2182,zk3:2183", "zk1:2181, zk2:2182,zk3:2183"),
    "EAT_PREFIX": ("  my-app.v2_x  ", "my-app.v2_x"),
    "EAT_ZK_SESSION_TIMEOUT": ("4.5", 4.5),
    "EAT_VISIBILITY_TIMEOUT": ("12", 12.0),
    "EAT_HANDLER_TIMEOUT": ("0.5", 0.5),
    "EAT_MAX_DELIVERIES": ("7", 7),
    "EAT_MAX_MESSAGE_BYTES": ("1024", 1024),
    "EAT_MAX_BATCH_BYTES": ("1048576", 1048576),
    "EAT_HTTP_MAX_HEADER_BYTES": ("16384", 16384),
    "EAT_HTTP_HEADER_TIMEOUT": ("2.5", 2.5),
    "EAT_HTTP_BODY_TIMEOUT": ("60", 60.0),
    "EAT_HTTP_SEND_TIMEOUT": ("45", 45.0),
    "EAT_HTTP_IDLE_TIMEOUT": ("75", 75.0),
    "EAT_HTTP_MAX_CONNECTIONS": ("20000", 20000),
    "EAT_HTTP_MAX_BUFFERED_BYTES": ("536870912", 536870912),
    "EAT_RETENTION": ("0.5", 0.5),
    "EAT_RETRY_BASE": ("0.25", 0.25),
    "EAT_RETRY_MAX": ("60", 60.0),
    "EAT_PROMOTE_BATCH": ("250", 250),
    "EAT_READ_COUNT": (" 10 ", 10),
    "EAT_DEAD_MAXLEN": ("5000", 5000),
    "EAT_LOG_FORMAT": ("json", "json"),
    "EAT_LOG_LEVEL": ("debug", "debug"),
    "EAT_API_TOKEN": ("s3cret-token-0123456789", "s3cret-token-0123456789"),
    "EAT_HEALTH_HOST": ("0.0.0.0", "0.0.0.0"),
    "EAT_HEALTH_PORT": ("9090", 9090),
    "EAT_ZK_AUTH": ("svc:pass", "svc:pass"),
    "EAT_REDIS_CA_FILE": ("", ""),
    "EAT_API_URL": ("https://eat.example:8443", "https://eat.example:8443"),
    "EAT_UI": ("off", False),
    "EAT_UI_READ_ONLY": ("true", True),
    "EAT_LEGACY_BRIDGE": (" False ", False),
    "EAT_LEGACY_HTTP": ("yes", True),
    "EAT_REDIS_CLUSTER": ("true", "true"),
    "EAT_PARTITIONS": ("16", 16),
    "EAT_WAIT_REPLICAS": ("1", 1),
    "EAT_WAIT_TIMEOUT_MS": ("250", 250),
    "EAT_ALLOW_EVICTION": ("yes", True),
    "EAT_MEMORY_POLICY_INTERVAL": ("2.5", 2.5),
    "EAT_LEGACY_QUEUE": ("OldQueue", "OldQueue"),
    "EAT_LEGACY_DELAYED": ("LegacyDelayed", "LegacyDelayed"),
    "EAT_LEGACY_IN_FLIGHT": ("LegacyInFlight", "LegacyInFlight"),
    "EAT_SCHEDULE_CATCHUP": ("all", "all"),
    "EAT_SCHEDULE_MIN_INTERVAL": ("0.5", 0.5),
    "EAT_WEBHOOK_URL": ("https://hooks.example.com/in", "https://hooks.example.com/in"),
    "EAT_WEBHOOK_SECRET": (
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    ),
    "EAT_WEBHOOK_TIMEOUT": ("2.5", 2.5),
    "EAT_WEBHOOK_ALLOW": (
        "*.example.com, http://127.0.0.1:9000",
        "*.example.com, http://127.0.0.1:9000",
    ),
    "EAT_WEBHOOK_PER_ORIGIN": ("4", 4),
    "EAT_WEBHOOK_RESOLVE_TIMEOUT": ("0.5", 0.5),
}


def test_every_setting_has_a_parse_case_here():
    assert set(GOOD_VALUES) == set(VARIABLES)


@pytest.mark.parametrize(("variable", "case"), sorted(GOOD_VALUES.items()))
def test_each_variable_is_parsed_into_its_field(variable: str, case: tuple[str, object]):
    raw, expected = case
    settings = Settings.from_env({variable: raw})
    value = getattr(settings, VARIABLES[variable])
    assert value == expected
    assert type(value) is type(expected)
    others = {n: getattr(settings, n) for n in FIELDS if n != VARIABLES[variable]}
    assert others == {n: getattr(Settings(), n) for n in others}


def test_unix_socket_redis_url_is_accepted():
    assert Settings.from_env({"EAT_REDIS_URL": "unix:///run/redis.sock"}).redis_url.startswith(
        "unix://"
    )


def test_ipv6_zookeeper_host_is_accepted():
    assert Settings.from_env({"EAT_ZK_HOSTS": "[::1]:2181"}).zk_hosts == "[::1]:2181"


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"EAT_REDIS_URL": "http://localhost:6379"}, "EAT_REDIS_URL"),
        ({"EAT_REDIS_URL": "localhost:6379"}, "EAT_REDIS_URL"),
        ({"EAT_REDIS_URL": "memcached://x"}, "EAT_REDIS_URL"),
        ({"EAT_ZK_HOSTS": "localhost"}, "EAT_ZK_HOSTS"),
        ({"EAT_ZK_HOSTS": "zk1:2181,"}, "EAT_ZK_HOSTS"),
        ({"EAT_ZK_HOSTS": "zk1:2181,zk2"}, "EAT_ZK_HOSTS"),
        ({"EAT_ZK_HOSTS": "zk1:port"}, "EAT_ZK_HOSTS"),
        ({"EAT_ZK_HOSTS": "zk 1:2181"}, "EAT_ZK_HOSTS"),
        ({"EAT_ZK_HOSTS": "zk1:2181/chroot"}, "EAT_ZK_HOSTS"),
        ({"EAT_ZK_HOSTS": "zk1:99999"}, "EAT_ZK_HOSTS"),
        ({"EAT_ZK_HOSTS": "zk1:0"}, "EAT_ZK_HOSTS"),
        ({"EAT_ZK_HOSTS": "zk1:\u0662\u0661\u0668\u0661"}, "EAT_ZK_HOSTS"),  # Arabic-Indic
        ({"EAT_PREFIX": "has space"}, "EAT_PREFIX"),
        ({"EAT_PREFIX": "a{b}"}, "EAT_PREFIX"),
        ({"EAT_PREFIX": "a/b"}, "EAT_PREFIX"),
        ({"EAT_PREFIX": "a:b"}, "EAT_PREFIX"),
        ({"EAT_PREFIX": "x" * 65}, "EAT_PREFIX"),
        ({"EAT_PREFIX": "."}, "EAT_PREFIX"),
        ({"EAT_PREFIX": ".."}, "EAT_PREFIX"),
        ({"EAT_PREFIX": "é"}, "EAT_PREFIX"),
        ({"EAT_LOG_FORMAT": "xml"}, "EAT_LOG_FORMAT"),
        ({"EAT_LOG_FORMAT": "JSON"}, "EAT_LOG_FORMAT"),
        ({"EAT_LOG_LEVEL": "verbose"}, "EAT_LOG_LEVEL"),
        ({"EAT_PROMOTE_BATCH": "10001"}, "EAT_PROMOTE_BATCH"),
        ({"EAT_API_TOKEN": "short"}, "EAT_API_TOKEN"),
        ({"EAT_HEALTH_PORT": "70000"}, "EAT_HEALTH_PORT"),
        ({"EAT_PARTITIONS": "1025"}, "EAT_PARTITIONS"),
        ({"EAT_REDIS_CLUSTER": "maybe"}, "EAT_REDIS_CLUSTER"),
        ({"EAT_HTTP_MAX_HEADER_BYTES": "1023"}, "EAT_HTTP_MAX_HEADER_BYTES"),
        ({"EAT_HTTP_SEND_TIMEOUT": "0"}, "EAT_HTTP_SEND_TIMEOUT"),
        (
            {"EAT_MAX_BATCH_BYTES": "2048", "EAT_HTTP_MAX_BUFFERED_BYTES": "2047"},
            "EAT_HTTP_MAX_BUFFERED_BYTES",
        ),
        ({"EAT_ZK_AUTH": "no-colon"}, "EAT_ZK_AUTH"),
        ({"EAT_REDIS_CA_FILE": "/etc/hostname"}, "EAT_REDIS_CA_FILE"),
        ({"EAT_SCHEDULE_CATCHUP": "some"}, "EAT_SCHEDULE_CATCHUP"),
        ({"EAT_SCHEDULE_MIN_INTERVAL": "0.05"}, "EAT_SCHEDULE_MIN_INTERVAL"),
        ({"EAT_SCHEDULE_MIN_INTERVAL": "90000"}, "EAT_SCHEDULE_MIN_INTERVAL"),
        (
            {"EAT_REDIS_URL": "rediss://h:6380/0", "EAT_REDIS_CA_FILE": "/no/such/ca.pem"},
            "EAT_REDIS_CA_FILE",
        ),
    ],
)
def test_invalid_value_raises_settings_error_naming_the_variable(
    environ: dict[str, str], variable: str
):
    err = refused(environ)
    assert err.variable == variable
    assert str(err).startswith(variable)
    assert err.problem


INT_VARIABLES = sorted(v for v, n in VARIABLES.items() if FIELDS[n].type == "int")
FLOAT_VARIABLES = sorted(v for v, n in VARIABLES.items() if FIELDS[n].type == "float")


def test_numeric_variables_are_known():
    assert "EAT_MAX_DELIVERIES" in INT_VARIABLES
    assert "EAT_VISIBILITY_TIMEOUT" in FLOAT_VARIABLES


@pytest.mark.parametrize("variable", INT_VARIABLES)
@pytest.mark.parametrize("raw", ["ten", "1.5", "1.0", "1e3", "0x10", "--1", " "])
def test_non_integer_value_is_named(variable: str, raw: str):
    assert refused({variable: raw}).variable == variable


@pytest.mark.parametrize("variable", FLOAT_VARIABLES)
@pytest.mark.parametrize("raw", ["soon", "1s", "nan", "NaN", "inf", "-inf", "Infinity", "1e400"])
def test_non_numeric_or_non_finite_seconds_are_named(variable: str, raw: str):
    assert refused({variable: raw}).variable == variable


@pytest.mark.parametrize("variable", INT_VARIABLES + FLOAT_VARIABLES)
@pytest.mark.parametrize("raw", ["0", "-1"])
def test_zero_or_negative_number_is_named(variable: str, raw: str):
    if variable == "EAT_HEALTH_PORT" and raw == "0":
        assert Settings.from_env({variable: raw}).health_port == 0  # 0 means "off"
        return
    if variable == "EAT_WAIT_REPLICAS" and raw == "0":
        assert Settings.from_env({variable: raw}).wait_replicas == 0  # 0: the master's word
        return
    environ = {variable: raw}
    if variable == "EAT_RETRY_MAX":
        # Keep retry_max >= retry_base out of the way so the positivity check is what fails.
        environ["EAT_RETRY_BASE"] = "0.001"
    assert refused(environ).variable == variable


def test_a_refused_value_is_quoted_with_what_was_expected():
    assert str(refused({"EAT_MAX_DELIVERIES": " x "})) == (
        "EAT_MAX_DELIVERIES: expected an integer, got ' x '"
    )
    assert str(refused({"EAT_DEAD_MAXLEN": "007"})) == (
        "EAT_DEAD_MAXLEN: expected an integer, got '007'"
    )
    assert str(refused({"EAT_RETRY_BASE": "soon"})) == (
        "EAT_RETRY_BASE: expected a number of seconds, got 'soon'"
    )
    assert str(refused({"EAT_RETENTION": "nan"})) == "EAT_RETENTION: must be a finite number"
    assert str(refused({"EAT_LEGACY_BRIDGE": "maybe"})) == (
        "EAT_LEGACY_BRIDGE: expected true or false, got 'maybe'"
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("30", 30.0), ("0.5", 0.5), (" 2.5 ", 2.5), ("1e3", 1000.0), ("1.5E+2", 150.0)],
)
def test_seconds_are_numbers_written_as_in_json(raw: str, expected: float):
    value = Settings.from_env({"EAT_RETRY_BASE": "0.1", "EAT_RETRY_MAX": raw}).retry_max
    assert (value, type(value)) == (expected, float)


@pytest.mark.parametrize("raw", [".5", "5.", "+1", "1_000", "0x1p3", "٣"])
def test_numbers_in_other_spellings_are_refused(raw: str):
    assert refused({"EAT_RETRY_MAX": raw}).problem.startswith("expected a number of seconds")
    assert refused({"EAT_READ_COUNT": raw}).problem.startswith("expected an integer")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        *[(raw, True) for raw in ("true", "TRUE", "1", "yes", " Yes ", "on", "ON")],
        *[(raw, False) for raw in ("false", "False", "0", "no", "NO", "off", " Off ")],
    ],
)
def test_a_switch_reads_true_false_1_0_yes_no_on_off_in_any_case(raw: str, expected: bool):
    assert Settings.from_env({"EAT_LEGACY_BRIDGE": raw}).legacy_bridge is expected


@pytest.mark.parametrize("raw", ["maybe", "t", "y", "2", "enabled"])
def test_any_other_switch_value_is_named(raw: str):
    assert refused({"EAT_LEGACY_BRIDGE": raw}).variable == "EAT_LEGACY_BRIDGE"


def test_retry_max_below_retry_base_is_named_as_retry_max():
    err = refused({"EAT_RETRY_BASE": "10", "EAT_RETRY_MAX": "5"})
    assert err.variable == "EAT_RETRY_MAX"


def test_retry_max_equal_to_retry_base_is_accepted():
    settings = Settings.from_env({"EAT_RETRY_BASE": "5", "EAT_RETRY_MAX": "5"})
    assert settings.retry_base == settings.retry_max == 5.0


def test_overrides_win_over_the_environment():
    environ = {"EAT_PREFIX": "from-env", "EAT_MAX_DELIVERIES": "3", "EAT_RETENTION": "9"}
    settings = Settings.from_env(environ, prefix="from-flag", max_deliveries=8)
    assert settings.prefix == "from-flag"
    assert settings.max_deliveries == 8
    assert settings.retention == 9.0  # not overridden: the environment's value


def test_none_override_means_not_given():
    settings = Settings.from_env({"EAT_PREFIX": "from-env"}, prefix=None)
    assert settings.prefix == "from-env"


def test_override_that_fixes_a_bad_environment_value_wins():
    assert Settings.from_env({"EAT_LOG_LEVEL": "loud"}, log_level="info").log_level == "info"


def test_override_wins_even_over_an_environment_value_that_does_not_parse():
    settings = Settings.from_env({"EAT_MAX_DELIVERIES": "many"}, max_deliveries=3)
    assert settings.max_deliveries == 3


def test_overrides_are_converted_to_the_field_type():
    settings = Settings.from_env({}, retention=9, max_deliveries="4")
    assert (settings.retention, type(settings.retention)) == (9.0, float)
    assert settings.max_deliveries == 4


def test_unknown_override_is_a_type_error():
    with pytest.raises(TypeError, match="max_delivery"):
        Settings.from_env({}, max_delivery=3)


def test_invalid_override_is_named_by_its_variable():
    assert refused({}, max_deliveries=0).variable == "EAT_MAX_DELIVERIES"
    assert refused({}, redis_url="http://x").variable == "EAT_REDIS_URL"
    assert (
        str(refused({}, max_deliveries="x")) == "EAT_MAX_DELIVERIES: expected an integer, got 'x'"
    )
    assert refused({}, retry_max=float("inf")).variable == "EAT_RETRY_MAX"


def test_override_prefix_with_trailing_newline_is_refused():
    # Overrides are not stripped; a `$`-anchored pattern would let "eat\n" through.
    assert refused({}, prefix="eat\n").variable == "EAT_PREFIX"


def test_documentation_lists_every_field_with_its_default_and_a_description():
    docs = Settings.documentation()
    assert [variable for variable, _, _ in docs] == [
        "EAT_" + f.name.upper() for f in dataclasses.fields(Settings)
    ]
    for variable, default, description in docs:
        expected = FIELDS[VARIABLES[variable]].default
        if isinstance(expected, bool):
            assert default == str(expected).lower()  # as the variable is written
        else:
            assert default == (str(expected) if expected != "" else "(unset)")
        assert description.strip()


def test_process_environment_is_used_when_no_mapping_is_given(monkeypatch: pytest.MonkeyPatch):
    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("EAT_PREFIX", "from-os")
    assert Settings.from_env().prefix == "from-os"


def test_secrets_never_appear_in_the_settings_repr():
    settings = Settings.from_env(
        {
            "EAT_REDIS_URL": "redis://user:hunter2-password@redis:6379/0",
            "EAT_API_TOKEN": "token-0123456789-abcdef",
            "EAT_ZK_AUTH": "svc:zk-password-42",
        }
    )
    text = repr(settings)
    for secret in ("hunter2-password", "token-0123456789-abcdef", "zk-password-42"):
        assert secret not in text
