"""Settings from a `.env` file in the working directory, under the environment."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    for name in ("RABBITMQ_URL", "DATABASE_URL", "QUIET_HOURS", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_dotenv_file_fills_in_what_the_environment_leaves_unset(workdir):
    (workdir / ".env").write_text("RABBITMQ_URL=amqp://u:p@127.0.0.1:5673/\nQUIET_HOURS=off\n")
    settings = Settings()
    assert settings.rabbitmq_url == "amqp://u:p@127.0.0.1:5673/"
    assert settings.quiet_hours == "off"


def test_the_environment_wins_over_the_dotenv_file(workdir, monkeypatch):
    (workdir / ".env").write_text("RABBITMQ_URL=amqp://from-file:5672/\n")
    monkeypatch.setenv("RABBITMQ_URL", "amqp://from-env:5672/")
    assert Settings().rabbitmq_url == "amqp://from-env:5672/"


def test_a_bad_value_in_the_dotenv_file_is_refused_by_name(workdir):
    (workdir / ".env").write_text("QUIET_HOURS=noon\n")
    with pytest.raises(ValueError, match="QUIET_HOURS"):
        Settings()


def test_without_a_dotenv_file_the_defaults_hold(workdir):
    assert Settings().rabbitmq_url == "amqp://guest:guest@127.0.0.1:5672/"


def test_the_example_file_is_valid_and_points_at_compose(workdir):
    shutil.copy(ROOT / ".env.example", workdir / ".env")
    settings = Settings()
    assert settings.rabbitmq_url == "amqp://followups:followups@127.0.0.1:5672/"
    assert settings.database_url == "postgresql://postgres:followups@127.0.0.1:5432/followups"
    assert settings.openai_api_key is None  # placeholders stay commented out
