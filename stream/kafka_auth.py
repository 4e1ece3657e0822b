"""OAUTHBEARER token providers for kafka-python: a static token, or one imported from ``module:attr``."""

from __future__ import annotations

import importlib

from kafka.net.sasl.oauth import AbstractTokenProvider


class StaticToken(AbstractTokenProvider):
    """Always the same bearer token (e.g. a long-lived service token from a secret store, rotated by restart)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def token(self) -> str:
        """The token."""
        return self._token


def token_provider(token: str, spec: str) -> AbstractTokenProvider:
    """``StaticToken(token)`` if ``token``, else the provider ``spec`` ("module:attr") names: an
    ``AbstractTokenProvider`` instance, or a class or factory called with no arguments that returns one.

    >>> token_provider("", "ebrflow.stream.kafka_auth:StaticToken")
    Traceback (most recent call last):
    ValueError: ebrflow.stream.kafka_auth:StaticToken() failed: TypeError
    """
    if token:
        return StaticToken(token)
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{spec!r} is not 'module:attr'")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import {spec!r}: {type(exc).__name__}") from None
    if not isinstance(obj, AbstractTokenProvider):
        try:
            obj = obj()
        except Exception as exc:  # noqa: BLE001 - any failure of the user's factory is a configuration error
            raise ValueError(f"{spec}() failed: {type(exc).__name__}") from None
    if not isinstance(obj, AbstractTokenProvider):
        raise ValueError(f"{spec} is not a kafka-python AbstractTokenProvider (kafka.net.sasl.oauth)")
    return obj
