"""The one shape of a service: `build(config) -> Service`.

Each service module defines `CONFIG` (its config schema) and
`build(config, *, transport=None)`, returning a subclass of `Service` whose fields are the
typed handles its tests and pages need (the book, the sinks, the stores) beside the `app`
that `posttrade worker` runs; nothing is hung on the App. The App comes from
`wiring.new_app(config, transport)`: NATS as configured, or the memory transport a unit
test passes. `config.service.namespace` isolates a service on a shared bus.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..app import App
from ..config import ServiceConfig


@dataclass
class Service:
    app: App
    config: ServiceConfig
