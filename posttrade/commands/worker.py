"""`posttrade worker SERVICE`: run one of the six services in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from ..config import SERVICES, ConfigError, load_config
from ..services import service_module


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("worker", help="run one service (agents, timers and its web API)")
    parser.add_argument("service", choices=SERVICES)
    parser.add_argument("--config", help="config file (default: config/backend/SERVICE/config.yaml)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        module = service_module(args.service)
        config = load_config(args.service, module.CONFIG, path=args.config)
    except (LookupError, ConfigError) as exc:
        print(f"posttrade worker: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.service.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Per-request client logs would drown the service's own.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = module.build(config)
    asyncio.run(
        app.run(
            host=config.service.host,
            port=config.service.port,
            metrics_port=config.service.metrics_port,
            auth_token=config.service.auth_token,
            read_token=config.service.read_token,
            protect_health=config.service.protect_health,
        )
    )
    return 0
