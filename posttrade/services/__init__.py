"""The six services: each module here wires agents, tables, sinks and pages into an App.

A service module exposes `CONFIG` (its config schema, a `ServiceConfig` subclass) and
`build(config, *, transport=None)`, returning its `Service` (base.py): the App and typed
handles. `posttrade worker NAME` loads the config and runs the App on the service's port.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..config import SERVICES


def service_module(name: str) -> ModuleType:
    if name not in SERVICES:
        raise LookupError(f"unknown service {name!r}; the services are: {', '.join(SERVICES)}")
    try:
        return importlib.import_module(f"posttrade.services.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"posttrade.services.{name}":
            raise LookupError(f"service {name!r} is not built yet") from None
        raise
