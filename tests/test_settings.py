"""Settings come from four layers, `config show` says which one won, and mistakes are named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from support import REPO, syncproxy
from syncproxy.settings import OPTIONS, SettingsError, example_toml, read_config_file


def show_rows(result_stdout: str) -> dict[str, tuple[str, str]]:
    """Parse `config show` output into {setting: (value, source)}."""
    rows = {}
    for line in result_stdout.splitlines()[1:]:
        if line.startswith("config file: "):
            break
        name, value, source = re.split(r"\s{2,}", line.strip(), maxsplit=2)
        rows[name] = (value, source)
    return rows


def test_each_layer_shown_with_winner(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = data_dir / "syncproxy.toml"
    config.write_text('port = 1001\nkeep_alive_timeout = 11\nlog_level = "warning"\n')
    result = syncproxy("config", "show", "--data-dir", str(data_dir), "--port", "1003",
                       env={"SYNCPROXY_PORT": "1002", "SYNCPROXY_KEEP_ALIVE_TIMEOUT": "22"})
    rows = show_rows(result.stdout)

    assert rows["port"][0] == "1003"
    assert rows["port"][1] == (f"command line --port (overrides file {config}; "
                               "environment SYNCPROXY_PORT)")
    assert rows["keep_alive_timeout"] == ("22.0", f"environment SYNCPROXY_KEEP_ALIVE_TIMEOUT "
                                                  f"(overrides file {config})")
    assert rows["log_level"] == ("warning", f"file {config}")
    assert rows["max_body_mb"] == ("100", "default")
    assert rows["data_dir"] == (str(data_dir), "command line --data-dir")
    assert f"config file: {config}" in result.stdout


def test_config_file_from_env_variable(tmp_path: Path) -> None:
    config = tmp_path / "elsewhere.toml"
    config.write_text(f'data_dir = "{tmp_path / "d"}"\nmax_body_mb = 250\n')
    result = syncproxy("config", "show", env={"SYNCPROXY_CONFIG": str(config)})
    rows = show_rows(result.stdout)
    assert rows["max_body_mb"] == ("250", f"file {config}")
    # An explicit file may move the data directory; the data directory's own may not.
    assert rows["data_dir"] == (str(tmp_path / "d"), f"file {config}")


def test_secrets_in_urls_are_masked(tmp_path: Path) -> None:
    result = syncproxy("config", "show", "--data-dir", str(tmp_path),
                       "--upstream", "http://sync:hunter2@127.0.0.1:8080/")
    assert "hunter2" not in result.stdout
    assert show_rows(result.stdout)["upstream"][0] == "http://sync:********@127.0.0.1:8080/"


@pytest.mark.parametrize("where, text, expected", [
    ("file", "max_body_megs = 5", ["unknown key 'max_body_megs'", "did you mean max_body_mb?"]),
    ("file", "[server]\nport = 5", ["unknown table 'server'", "top-level keys"]),
    ("file", 'port = "8443"', ["invalid value '8443' for port", "expected an integer"]),
    ("file", "port = true", ["invalid value True for port", "expected an integer"]),
    ("file", "port = 70000", ["70000 is out of range for port",
                              "expected an integer from 0 to 65535"]),
    ("file", 'log_level = "verbose"', ["'verbose' is not valid for log_level",
                                       "one of debug, info, warning, error"]),
    ("file", 'log_level = "warn"', ["did you mean warning?"]),
    ("file", "tls = 1", ["invalid value 1 for tls", "expected true or false"]),
    ("file", "hostname = [1, 2]", ["invalid value [1, 2] for hostname"]),
    ("file", 'cert = ""', ["invalid value '' for cert", "expected a path"]),
    ("file", "port = ", ["is not valid TOML"]),
    ("env", "SYNCPROXY_MAX_BODY_MEGS=5", ["unknown environment variable SYNCPROXY_MAX_BODY_MEGS",
                                          "did you mean SYNCPROXY_MAX_BODY_MB?"]),
    ("env", "SYNCPROXY_PORT=http", ["SYNCPROXY_PORT: invalid value 'http' for port",
                                    "expected an integer"]),
    ("env", "SYNCPROXY_PORT=", ["SYNCPROXY_PORT: invalid value '' for port"]),
    ("env", "SYNCPROXY_TLS=maybe", ["invalid value 'maybe' for tls"]),
    ("env", "SYNCPROXY_MAX_BODY_MB=0", ["0 is out of range for max_body_mb",
                                        "from 1 to 65536"]),
    ("env", "SYNCPROXY_UPSTREAM_IDLE_TIMEOUT=nan", ["invalid value nan"]),
    ("cli", "--max-body-megs=5", ["unrecognized arguments: --max-body-megs=5",
                                  "did you mean --max-body-mb?"]),
    ("cli", "--max-body=5", ["unrecognized arguments"]),
    ("cli", "--port=99999", ["--port: 99999 is out of range for port"]),
    ("cli", "--port=x", ["invalid int value: 'x'"]),
])
def test_mistakes_stop_start_with_reason(tmp_path: Path, where: str, text: str,
                                         expected: list[str]) -> None:
    args = ["serve", "--data-dir", str(tmp_path / "data"), "--port", "1"]
    env = {}
    if where == "file":
        config = tmp_path / "settings.toml"
        config.write_text(text + "\n")
        args += ["--config", str(config)]
    elif where == "env":
        name, _, value = text.partition("=")
        env[name] = value
    else:
        args.append(text)
    result = syncproxy(*args, env=env, check=False)
    assert result.returncode == 2, result.stderr
    for fragment in expected:
        assert fragment in result.stderr
    # The start stopped before anything was created.
    assert not (tmp_path / "data").exists()


def test_data_dir_key_rejected_in_own_file(tmp_path: Path) -> None:
    (tmp_path / "syncproxy.toml").write_text(f'data_dir = "{tmp_path / "other"}"\n')
    result = syncproxy("config", "show", "--data-dir", str(tmp_path), check=False)
    assert result.returncode == 2
    assert "key data_dir cannot be set in the data directory's own syncproxy.toml" in (
        result.stderr)
    assert "--config" in result.stderr


def test_config_check_validates_file(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("port = 444\nmax_body_mb = 300\n")
    assert syncproxy("config", "check", str(good)).stdout.strip() == f"{good}: valid, 2 setting(s)"
    bad = tmp_path / "bad.toml"
    bad.write_text("prot = 444\n")
    result = syncproxy("config", "check", str(bad), check=False)
    assert result.returncode == 2
    assert "unknown key 'prot'; did you mean port?" in result.stderr


def test_example_file_is_current() -> None:
    shipped = (REPO / "config" / "syncproxy.example.toml").read_text()
    assert shipped == example_toml(), (
        "config/syncproxy.example.toml is stale: regenerate it with "
        "'python -m syncproxy config example > config/syncproxy.example.toml'")
    assert syncproxy("config", "example").stdout == shipped


def test_example_documents_every_key(tmp_path: Path) -> None:
    text = example_toml()
    # Uncommenting every setting line must give a valid file that sets every option.
    uncommented = "\n".join(line[2:] for line in text.splitlines()
                            if re.match(r"# [a-z_]+ = ", line))
    path = tmp_path / "all.toml"
    path.write_text(uncommented + "\n")
    values = read_config_file(path)
    assert sorted(values) == sorted(option.name for option in OPTIONS)
    for option in OPTIONS:
        assert option.env in text
        assert option.flag in text


def test_missing_config_file_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="config file not found: /nonexistent/x.toml"):
        read_config_file(Path("/nonexistent/x.toml"))
    result = syncproxy("config", "show", "--data-dir", str(tmp_path),
                       env={"SYNCPROXY_CONFIG": str(tmp_path / "missing.toml")}, check=False)
    assert result.returncode == 2
    assert f"config file not found: {tmp_path / 'missing.toml'}" in result.stderr
