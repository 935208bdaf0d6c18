"""Settings: defaults, parsing of environment values, and start-up errors that name the variable."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from backend.settings import Settings, describe_settings_error
from tests.conftest import ROOT


def test_defaults_suit_the_32b_model_on_an_a100(monkeypatch):
    settings = Settings(_env_file=None)
    assert settings.model_id == "FreedomIntelligence/ShizhenGPT-32B-VL"
    assert settings.max_gpu_memory == "75GiB"
    assert settings.device_map == "auto"
    assert settings.dtype == "auto"
    assert settings.max_pixels == 360 * 420
    assert settings.model_name == settings.model_id
    assert settings.hub_cache_dir is None


def test_environment_values_are_parsed(monkeypatch):
    monkeypatch.setenv("CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("HF_HOME", "/workspace/models")
    monkeypatch.setenv("MODEL_REVISION", "")
    monkeypatch.setenv("SERVED_MODEL_NAME", "shizhen")
    monkeypatch.setenv("MAX_GPU_MEMORY", "70 GiB")
    settings = Settings(_env_file=None)
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert str(settings.hub_cache_dir) == "/workspace/models/hub"
    assert settings.model_revision is None
    assert settings.model_name == "shizhen"
    assert settings.max_gpu_memory == "70GiB"


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("PORT", "eighty", "PORT"),
        ("PORT", "70000", "PORT"),
        ("DTYPE", "int4", "DTYPE"),
        ("MAX_GPU_MEMORY", "lots", "MAX_GPU_MEMORY"),
        ("DEFAULT_MAX_TOKENS", "0", "DEFAULT_MAX_TOKENS"),
    ],
)
def test_a_bad_value_names_its_variable(monkeypatch, variable, value, fragment):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None)
    message = describe_settings_error(caught.value)
    assert f"  {fragment}:" in message
    assert repr(value) in message


def test_cross_field_rule(monkeypatch):
    monkeypatch.setenv("DEFAULT_MAX_TOKENS", "9000")
    monkeypatch.setenv("MAX_TOKENS_LIMIT", "100")
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None)
    assert "DEFAULT_MAX_TOKENS must not exceed MAX_TOKENS_LIMIT" in describe_settings_error(caught.value)


def test_python_m_backend_refuses_to_start_with_a_bad_value():
    env = {"PATH": "/usr/bin:/bin", "PORT": "not-a-port", "HOME": "/tmp"}
    result = subprocess.run(
        [sys.executable, "-m", "backend"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "PORT:" in result.stderr and "not-a-port" in result.stderr


def test_env_example_lists_every_setting_and_only_settings():
    path = ROOT / ".env.example"
    names = {
        line.split("=", 1)[0].strip().lower()
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    assert names == set(Settings.model_fields)
    settings = Settings(_env_file=path)
    assert settings.hf_home is not None and settings.max_pixels == 360 * 420
