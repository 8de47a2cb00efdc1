"""qvlm_modifiers.upstream: the one place that touches upstream internals, version-guarded."""

from __future__ import annotations

import importlib.metadata

import pytest

import qvlm_modifiers  # noqa: F401  (install() ran at import)
from qvlm_modifiers import upstream


def test_installed_versions_are_the_supported_ones():
    assert upstream.check_versions(strict=True) == []
    upstream.check_private_names()


def _fake_versions(monkeypatch, **versions):
    real = importlib.metadata.version

    def version(dist):
        return versions.get(dist, real(dist))

    monkeypatch.setattr(importlib.metadata, "version", version)


def test_unsupported_version_fails_loudly_with_the_fix(monkeypatch):
    _fake_versions(monkeypatch, transformers="5.20.0")
    monkeypatch.delenv(upstream.ENV_ALLOW_UNTESTED, raising=False)
    with pytest.raises(upstream.UpstreamVersionError, match=r"transformers 5\.20\.0 is installed.*pip install"):
        upstream.check_versions()


def test_untested_versions_can_be_allowed_explicitly(monkeypatch, caplog):
    _fake_versions(monkeypatch, **{"compressed-tensors": "0.20.0"})
    monkeypatch.setenv(upstream.ENV_ALLOW_UNTESTED, "1")
    problems = upstream.check_versions()
    assert problems == ["compressed-tensors 0.20.0 is installed, this package supports >=0.19.0,<0.19.1"]
    assert "running untested" in caplog.text


def test_a_vanished_private_name_is_named(monkeypatch):
    monkeypatch.setattr(upstream, "PRIVATE_NAMES", (("llmcompressor.entrypoints.utils", "no_such_function"),))
    with pytest.raises(upstream.UpstreamVersionError, match="llmcompressor.entrypoints.utils.no_such_function"):
        upstream.check_private_names()


def test_import_applied_the_integrations_once():
    import llmcompressor.entrypoints.utils as lc_entry_utils

    assert upstream.is_registered()
    assert getattr(lc_entry_utils.modify_save_pretrained, "_qvlm_hook", False)
    upstream.install()  # idempotent
    assert getattr(lc_entry_utils.modify_save_pretrained, "_qvlm_hook", False)
