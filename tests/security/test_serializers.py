"""The worker app never accepts a content type that can run code when decoded."""

from __future__ import annotations

from kombu.serialization import registry

import workers.app

UNSAFE = ("pickle", "yaml", "application/x-python-serialize", "application/x-yaml")


def _names(content_types: object) -> set[str]:
    assert isinstance(content_types, (list, tuple, set, frozenset)), content_types
    return {str(c).lower() for c in content_types}


def test_accept_content_is_msgpack_and_json_only() -> None:
    conf = workers.app.app.conf
    accepted = _names(conf.accept_content)
    assert accepted == {"msgpack", "json"}
    assert not accepted & set(UNSAFE)


def test_result_accept_content_is_json_only() -> None:
    conf = workers.app.app.conf
    assert _names(conf.result_accept_content) == {"json"}
    assert conf.result_serializer == "json"
    assert conf.task_serializer == "json"


def test_accepted_content_types_resolve_to_safe_decoders() -> None:
    """What kombu actually decodes: the MIME types behind the accepted names."""
    conf = workers.app.app.conf
    mimes = {registry.name_to_type.get(n, n) for n in _names(conf.accept_content)}
    assert mimes == {"application/x-msgpack", "application/json"}
    mimes = {registry.name_to_type.get(n, n) for n in _names(conf.result_accept_content)}
    assert mimes == {"application/json"}
