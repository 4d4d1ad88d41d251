"""The settings object: flags, env vars, precedence, and the configuration doc."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import (
    SETTING_GROUPS,
    Settings,
    add_arguments,
    grouped_settings,
    settings_from_args,
    settings_table,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def parse(argv: list[str]) -> Settings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args(argv))


def test_defaults_serve_the_reference_model() -> None:
    s = Settings()
    assert s.model == "TheBloke/Llama-2-13B-GPTQ" and s.revision == "main"
    assert s.port == 8000 and s.chat_template == "default"
    assert s.model_names == ["Llama-2-13B-GPTQ"]


def test_env_vars_apply_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTQ_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("GPTQ_PORT", "9001")
    monkeypatch.setenv("GPTQ_API_KEYS", "a, b")
    monkeypatch.setenv("GPTQ_WARMUP", "false")
    s = parse(["--port", "9002"])
    assert s.max_num_seqs == 7 and s.port == 9002
    assert s.api_keys == ["a", "b"] and s.warmup is False


def test_repeatable_flags_and_key_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("k3\n\nk4\n")
    s = parse(["--api-key", "k1", "--api-key", "k2", "--api-key-file", str(keys),
               "--served-model-name", "a,b"])
    assert s.api_keys == ["k1", "k2", "k3", "k4"] and s.model_names == ["a", "b"]


@pytest.mark.parametrize("argv", [["--port", "0"], ["--block-size", "12"],
                                  ["--device", "tpu"], ["--max-num-seqs", "x"],
                                  ["--gpu-memory-utilization", "1.5"],
                                  ["--log-format", "xml"]])
def test_invalid_values_are_refused(argv: list[str]) -> None:
    with pytest.raises(ValidationError):
        parse(argv)


def test_engine_config_carries_the_engine_settings() -> None:
    cfg = parse(["--model", "/m", "--max-model-len", "512", "--device", "cpu"]).engine_config()
    assert cfg.model == "/m" and cfg.max_model_len == 512 and cfg.device == "cpu"
    assert cfg.enable_prefix_caching is True
    assert parse(["--no-prefix-caching"]).engine_config().enable_prefix_caching is False


def test_the_configuration_doc_lists_every_setting_as_generated() -> None:
    assert settings_table() in DOC.read_text(), \
        "docs/configuration.md is stale: regenerate the table with `python -m app.settings`"


def test_observability_settings_default_to_text_logs_and_vllm_names(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().log_format == "text" and Settings().vllm_metrics is True
    monkeypatch.setenv("GPTQ_LOG_FORMAT", "json")
    monkeypatch.setenv("GPTQ_VLLM_METRICS", "false")
    s = parse([])
    assert s.log_format == "json" and s.vllm_metrics is False
    assert parse(["--vllm-metrics"]).vllm_metrics is True


def test_every_setting_is_in_exactly_one_group_in_the_users_order() -> None:
    listed = [name for group in SETTING_GROUPS for name in group.fields]
    assert len(listed) == len(set(listed)), "a setting is in two groups"
    missing = set(Settings.model_fields) - set(listed)
    assert not missing, f"add {sorted(missing)} to a group in app/settings.py SETTING_GROUPS"
    assert set(listed) <= set(Settings.model_fields), "SETTING_GROUPS names no such setting"
    assert [g.title for g, _ in grouped_settings()] == ["model", "engine", "lora", "server",
                                                        "security", "observability"]


def test_lora_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.lora.spec import LoraSpec

    assert Settings().engine_config().lora is None  # off unless asked for
    s = parse(["--lora-modules", "sql=/adapters/sql", "orca=someone/orca-lora@v2",
               "--lora-modules", "chat=/adapters/chat", "--max-loras", "2",
               "--max-lora-rank", "64"])
    lora = s.engine_config().lora
    assert lora is not None and (lora.max_loras, lora.max_lora_rank) == (2, 64)
    assert lora.adapters == (LoraSpec("sql", "/adapters/sql"),
                             LoraSpec("orca", "someone/orca-lora", "v2"),
                             LoraSpec("chat", "/adapters/chat"))
    assert not lora.allow_runtime_updates
    runtime = parse(["--allow-runtime-lora-updating"]).engine_config().lora
    assert runtime is not None and runtime.adapters == () and runtime.allow_runtime_updates
    monkeypatch.setenv("GPTQ_LORA_MODULES", "a=/x, b=/y")
    assert [a.name for a in Settings().lora_config().adapters] == ["a", "b"]  # type: ignore[union-attr]
    monkeypatch.delenv("GPTQ_LORA_MODULES")
    for argv, problem in ((["--lora-modules", "no-path"], "name=path"),
                          (["--lora-modules", "a=/x", "a=/y"], "given twice"),
                          (["--served-model-name", "tiny", "--lora-modules", "tiny=/x"],
                           "base model's served name"),
                          (["--max-loras", "0"], "max_loras")):
        with pytest.raises(ValidationError, match=problem):
            parse(argv)
