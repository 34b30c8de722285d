"""OpenAPI 3.1 for a service, generated from the routes it really serves.

`build_web_app` adds `GET /openapi.json`; the document lists every route of the
Starlette app (the service's pages, `/health`, `/metrics`, itself) with its methods and
path parameters, so it cannot drift from what the server answers. What a route means —
summary, query parameters, request body, extra responses — is written where the route
is declared, in its handler's docstring, the way Starlette's own schema generator reads
docstrings:

    @app.page("/positions")
    async def positions(request):
        '''Positions with P&L at the current marks.

        Optional longer text: the operation's description.

        ---
        query:
          account: only this account's positions
          method: {enum: [avg, fifo, both], default: both, description: how P&L is computed}
          limit: {type: integer, minimum: 1, maximum: 10000, default: 100}
        responses:
          404: no such position
        '''

Before the `---` line: the first line is the summary, the rest the description. After
it, YAML with these keys (all optional):

* `query`, `path`: parameter name → a description, or a mapping of JSON Schema keywords
  (`type` defaults to string) plus `description` and `required`. `$ref: Name` names one
  of the shared parameter schemas (web/params.py `SCHEMAS`: Name, Id, Date, Time,
  IsoTime, Interval, Bucket, Amount, ObjectName), whose parsers accept exactly what the
  schema says. Path parameters are taken from the route
  itself; `path` only describes them.
* `body`: `{description, required, content: a media type or a list of them, schema}`;
  or `content` maps each media type to its own schema.
* `responses`: status → a description, or `{description, content, schema}`. The first
  2xx given replaces the default `200`.

Every operation also gets the error answers the runtime produces: 400 when it takes
parameters or a body (`BadRequest`); when the service has a token (web/auth.py), the
bearer `security` requirement and 401 on every operation that needs one, and 403 on
state-changing ones when a read-only token exists; 503 when a store or the bus it needs
is down; 500 for an unexpected failure — all with the `Error` shape `{"error", "detail"}`.
A route without a docstring is listed with a summary made from its handler's name and a
plain `200`.
"""

from __future__ import annotations

import inspect
import re
from importlib import metadata
from typing import Any, Iterable

import yaml
from starlette import convertors
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .auth import PUBLIC, WRITE, AccessPolicy, Tokens
from .params import SCHEMAS as PARAMETER_SCHEMAS

OPENAPI_VERSION = "3.1.0"
OPENAPI_PATH = "/openapi.json"

# HEAD is answered for every GET by Starlette; it is not an operation of its own.
_DOCUMENTED_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")

# A path parameter's schema from its Starlette convertor (`{id:int}`); and what to say
# about it when the docstring does not.
_CONVERTOR_SCHEMAS: dict[type, tuple[dict[str, Any], str | None]] = {
    convertors.IntegerConvertor: ({"type": "integer"}, None),
    convertors.FloatConvertor: ({"type": "number"}, None),
    convertors.UUIDConvertor: ({"type": "string", "format": "uuid"}, None),
    convertors.PathConvertor: ({"type": "string"}, "may contain `/`"),
    convertors.StringConvertor: ({"type": "string"}, None),
}
_PATH_PARAMETER = re.compile(r"{([a-zA-Z_][a-zA-Z0-9_]*)(?::[a-zA-Z_][a-zA-Z0-9_]*)?}")

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "the HTTP reason in words, e.g. `bad request`"},
        "detail": {"description": "what is wrong: a message, or an object naming the parameter or field"},
    },
}

HEALTH_SCHEMA = {
    "type": "object",
    "required": ["service", "status", "checks"],
    "properties": {
        "service": {"type": "string"},
        "status": {
            "enum": ["ok", "degraded", "unhealthy"],
            "description": "ok and degraded answer 200 (degraded: working, but a check says something is not "
            "right, e.g. a dead-letter rate over its limit); unhealthy answers 503",
        },
        "checks": {
            "type": "object",
            "description": "check name (`nats`, `agent:<name>`, the service's own) → `{ok, degraded?, ...detail}`; "
            "an agent's detail has `dead_letters_per_min` and `dead_letter_rate_limit`, and `crash_looping` when it is",
            "additionalProperties": {
                "type": "object",
                "required": ["ok"],
                "properties": {"ok": {"type": "boolean"}, "degraded": {"type": "boolean"}},
            },
        },
        "reasons": {
            "type": "object",
            "description": "check name → why it is unhealthy or degraded (empty when the status is ok)",
            "additionalProperties": {"type": "string"},
        },
    },
}

JSON_OBJECT = {"type": "object"}


class RouteDocError(ValueError):
    """A route's docstring metadata is not what this module understands."""


def service_version() -> str:
    try:
        return metadata.version("posttrade")
    except metadata.PackageNotFoundError:
        return "0"


def openapi_document(
    service: str,
    routes: Iterable[BaseRoute],
    *,
    auth: bool = False,
    policy: AccessPolicy | None = None,
    version: str | None = None,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes` (what a service's web app serves).

    `policy` says which operations need which token; without one, `auth=True` means a
    token is configured and every route is confidential."""
    if policy is None:
        policy = AccessPolicy(Tokens(full="token" if auth else None))
    auth = policy.tokens.enabled
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue  # mounts and websockets: no service has one
        if not route.include_in_schema:
            continue  # dashboard pages and live streams
        methods = [m for m in _DOCUMENTED_METHODS if m in (route.methods or {"GET"})]
        doc = route_doc(route.endpoint, route.path)
        item = paths.setdefault(openapi_path(route.path), {})
        for method in methods:
            item[method.lower()] = _operation(route, method, doc, policy=policy)
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": f"posttrade {service}",
            "version": version or service_version(),
            "description": (
                f"The HTTP API of the posttrade service `{service}`. Answers are JSON; exact "
                "numbers (money, quantities, prices) are decimal strings. Every error is JSON "
                "`{\"error\", \"detail\"}` with a 4xx/5xx status."
                + (
                    " Operations with a `security` requirement need `Authorization: Bearer <token>`: "
                    "reads take the service's auth token or its read-only token, changes only the auth token."
                    if auth else ""
                )
            ),
        },
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": {"Error": ERROR_SCHEMA, "Health": HEALTH_SCHEMA, **PARAMETER_SCHEMAS}},
    }
    if auth:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return document


def openapi_route(
    service: str, routes: list[BaseRoute], *, auth: bool = False, policy: AccessPolicy | None = None
) -> Route:
    """`GET /openapi.json` describing `routes` — the list this route is appended to, so
    the document (built at the first request, then kept) includes the route itself."""
    document: dict[str, Any] | None = None

    async def openapi(request: Request) -> Response:
        """This document: the service's HTTP API as OpenAPI 3.1.

        ---
        responses:
          200: {description: the OpenAPI document, content: application/json, schema: {type: object}}
        """
        nonlocal document
        if document is None:
            document = openapi_document(service, routes, auth=auth, policy=policy)
        return JSONResponse(document)

    return Route(OPENAPI_PATH, openapi, methods=["GET"])


def openapi_path(starlette_path: str) -> str:
    """`/bars/{symbol:path}` → `/bars/{symbol}` (OpenAPI has no convertors)."""
    return _PATH_PARAMETER.sub(lambda m: "{" + m.group(1) + "}", starlette_path)


class RouteDoc:
    """What a handler's docstring says about its route."""

    def __init__(self, summary: str, description: str, meta: dict[str, Any]):
        self.summary = summary
        self.description = description
        self.meta = meta


def route_doc(endpoint: Any, path: str) -> RouteDoc:
    text = inspect.getdoc(endpoint) or ""
    prose, separator, yaml_text = text.partition("\n---")
    if not separator and text.startswith("---"):
        prose, yaml_text = "", text[3:]
    lines = prose.strip().splitlines()
    summary = lines[0].strip() if lines else _summary_from_name(endpoint)
    description = "\n".join(lines[1:]).strip()
    meta: dict[str, Any] = {}
    if yaml_text.strip():
        try:
            meta = yaml.safe_load(yaml_text) or {}
        except yaml.YAMLError as exc:
            raise RouteDocError(f"{path}: the docstring's YAML after `---` does not parse: {exc}") from None
        if not isinstance(meta, dict):
            raise RouteDocError(f"{path}: the docstring's YAML after `---` must be a mapping")
        unknown = set(meta) - {"query", "path", "body", "responses"}
        if unknown:
            raise RouteDocError(f"{path}: unknown docstring keys {sorted(unknown)}; use query, path, body, responses")
    return RouteDoc(summary, description, meta)


def _summary_from_name(endpoint: Any) -> str:
    name = getattr(endpoint, "__name__", "") or "endpoint"
    return name.replace("_", " ").strip().capitalize()


def _operation(route: Route, method: str, doc: RouteDoc, *, policy: AccessPolicy) -> dict[str, Any]:
    path = openapi_path(route.path)
    operation: dict[str, Any] = {
        "operationId": _operation_id(method, path),
        "summary": doc.summary,
    }
    if doc.description:
        operation["description"] = doc.description
    parameters = _path_parameters(route, doc) + _query_parameters(doc, path)
    if parameters:
        operation["parameters"] = parameters
    body = doc.meta.get("body")
    if body is not None:
        operation["requestBody"] = _request_body(body, path)
    required = policy.required(route, method)
    operation["responses"] = _responses(
        doc, path, takes_input=bool(parameters) or body is not None,
        needs_token=required != PUBLIC, read_only_refused=required == WRITE and bool(policy.tokens.read),
    )  # fmt: skip
    if required != PUBLIC:
        operation["security"] = [{"bearer": []}]
    return operation


def _operation_id(method: str, path: str) -> str:
    words = re.sub(r"[^a-zA-Z0-9]+", "_", path).strip("_")
    return f"{method.lower()}_{words or 'root'}"


def _path_parameters(route: Route, doc: RouteDoc) -> list[dict[str, Any]]:
    described = doc.meta.get("path") or {}
    parameters = []
    for name, convertor in route.param_convertors.items():
        schema, note = _CONVERTOR_SCHEMAS.get(type(convertor), ({"type": "string"}, None))
        spec = _parameter(name, "path", described.get(name), route.path, schema)
        spec["required"] = True
        if note and "description" not in spec:
            spec["description"] = note
        parameters.append(spec)
    unknown = set(described) - set(route.param_convertors)
    if unknown:
        raise RouteDocError(f"{route.path}: the docstring describes path parameters the route lacks: {sorted(unknown)}")
    return parameters


def _query_parameters(doc: RouteDoc, path: str) -> list[dict[str, Any]]:
    query = doc.meta.get("query") or {}
    if not isinstance(query, dict):
        raise RouteDocError(f"{path}: `query` must map parameter names to descriptions")
    return [_parameter(str(name), "query", spec, path, {"type": "string"}) for name, spec in query.items()]


def _parameter(name: str, where: str, spec: Any, path: str, default_schema: dict[str, Any]) -> dict[str, Any]:
    parameter: dict[str, Any] = {"name": name, "in": where}
    schema = dict(default_schema)
    if isinstance(spec, str):
        parameter["description"] = spec
    elif isinstance(spec, dict):
        spec = dict(spec)
        if "description" in spec:
            parameter["description"] = str(spec.pop("description"))
        if spec.pop("required", False):
            parameter["required"] = True
        if "enum" in spec and "type" not in spec:
            schema.pop("type", None)  # the enum's values say it
        if "$ref" in spec:
            ref = str(spec["$ref"])
            if not ref.startswith("#"):
                if ref not in PARAMETER_SCHEMAS:
                    raise RouteDocError(f"{path}: parameter {name!r}: no shared schema {ref!r}; one of {sorted(PARAMETER_SCHEMAS)}")
                spec["$ref"] = f"#/components/schemas/{ref}"
            schema = {}  # the referenced schema says everything
        schema.update(spec)
    elif spec is not None:
        raise RouteDocError(f"{path}: parameter {name!r} needs a description or a mapping")
    parameter["schema"] = schema
    return parameter


def _content(spec: dict[str, Any], default_type: str | None) -> dict[str, Any] | None:
    types = spec.get("content", default_type)
    if types is None:
        return None
    if isinstance(types, dict):  # media type → its own schema
        return {t: ({"schema": s} if s is not None else {}) for t, s in types.items()}
    if isinstance(types, str):
        types = [types]
    schema = spec.get("schema")
    return {t: ({"schema": schema} if schema is not None else ({"schema": JSON_OBJECT} if t == "application/json" else {})) for t in types}


def _request_body(body: Any, path: str) -> dict[str, Any]:
    if isinstance(body, str):
        body = {"description": body}
    if not isinstance(body, dict):
        raise RouteDocError(f"{path}: `body` must be a description or a mapping")
    request_body: dict[str, Any] = {"content": _content(body, "application/json")}
    if "description" in body:
        request_body["description"] = str(body["description"])
    if body.get("required"):
        request_body["required"] = True
    return request_body


def _response(spec: Any, path: str) -> dict[str, Any]:
    if isinstance(spec, str):
        spec = {"description": spec}
    if not isinstance(spec, dict):
        raise RouteDocError(f"{path}: a response must be a description or a mapping")
    response: dict[str, Any] = {"description": str(spec.get("description", ""))}
    content = _content(spec, "application/json" if "schema" in spec else None)
    if content:
        response["content"] = content
    return response


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _responses(
    doc: RouteDoc, path: str, *, takes_input: bool, needs_token: bool, read_only_refused: bool
) -> dict[str, Any]:
    declared = doc.meta.get("responses") or {}
    if not isinstance(declared, dict):
        raise RouteDocError(f"{path}: `responses` must map status codes to descriptions")
    responses: dict[str, Any] = {}
    if not any(str(status).startswith("2") for status in declared):
        responses["200"] = {"description": "OK"}
    if takes_input:
        responses["400"] = _error("invalid request: `detail` names the parameter or field and what is wrong")
    if needs_token:
        responses["401"] = _error("the bearer token is missing or wrong")
    if read_only_refused:
        responses["403"] = _error("the read-only token cannot change state")
    responses["500"] = _error("unexpected failure")
    responses["503"] = _error("a store or the bus this answer needs is unavailable (`detail` says which)")
    for status, spec in declared.items():
        code = str(status)
        if code.startswith(("4", "5")) and isinstance(spec, str):
            responses[code] = _error(spec)  # errors always have the Error shape
        else:
            responses[code] = _response(spec, path)
    return dict(sorted(responses.items()))
