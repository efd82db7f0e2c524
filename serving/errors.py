"""One error schema for every route: OpenAI's {"error": {message, type, param, code}}."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.protocol import ErrorBody

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable", 504: "timeout_error",
          405: "invalid_request_error", 408: "timeout_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": _utf8(self.message), "type": _TYPES.get(self.status, "server_error"),
                          "param": _utf8(self.param), "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _utf8(text: str | None) -> str | None:
    # A message may echo the client's input, which JSON lets carry lone surrogates that UTF-8 cannot encode.
    return text if text is None else text.encode("utf-8", "replace").decode("utf-8")


def errors(*statuses: int) -> dict:
    """A route's `responses=`: each status answers with ErrorBody."""
    return {s: {"model": ErrorBody, "description": HTTPStatus(s).phrase} for s in statuses}


def document_errors(app, *, user_auth: bool = False, admin_auth: bool = False) -> None:
    """Make /openapi.json declare what the server really answers, so clients and fuzzers can trust it.

    FastAPI documents 422 for validation errors; we answer 400 (as OpenAI does). The request gate
    (serving/gate.py) answers 408/413 on every route and 401/403 on /v1 and /admin, so those are
    declared by rule here rather than on each route, where one could be forgotten."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
        for path, ops in schema.get("paths", {}).items():
            for op in ops.values():
                responses = op.setdefault("responses", {})
                validated = responses.pop("422", None) is not None or "requestBody" in op or op.get("parameters")
                statuses = [408, 413] + ([400] if validated else [])
                if path.startswith("/v1/"):
                    statuses.append(401)
                    if user_auth:
                        op["security"] = [{"userKey": []}]
                elif path.startswith("/admin/"):
                    statuses += [401, 403]
                    if admin_auth:
                        op["security"] = [{"adminKey": []}]
                for status in statuses:
                    responses.setdefault(str(status), {"description": HTTPStatus(status).phrase, **ref})
        bearer = {"type": "http", "scheme": "bearer"}
        schemes = {"userKey": {**bearer, "description": "an API key (api_keys)"},
                   "adminKey": {**bearer, "description": "the admin key (admin_key)"}}
        if user_auth or admin_auth:
            schema.setdefault("components", {})["securitySchemes"] = schemes
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        body = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components["ErrorBody"] = body
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def install_handlers(app) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        # Drop "body" and pydantic's union-branch tags ("function-after[...]", "list[TextPart]").
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and "[" not in str(p)]
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            msg = f"unknown field '{'.'.join(loc)}'"
        elif first.get("type") == "json_invalid":
            msg = "request body is not valid JSON"
        return APIError(400, msg, param=".".join(loc) or None, code=first.get("type")).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":  # FastAPI's words
            # json.loads failed on something other than syntax: bytes that are not UTF-8, or nesting
            # deeper than the recursion limit.
            return APIError(400, "request body is not valid JSON (not UTF-8, or nested too deeply)",
                            code="json_invalid").response()
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette names only the first route on the path; list them all
            from starlette.routing import Match

            allowed = {m for r in request.app.router.routes if getattr(r, "methods", None)
                       and r.matches(request.scope)[0] is not Match.NONE for m in r.methods}
            headers = {**(headers or {}), "Allow": ", ".join(sorted(allowed))}
        return APIError(exc.status_code, str(exc.detail), headers=headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        return JSONResponse({"error": {"message": "internal error", "type": "server_error", "param": None,
                                       "code": type(exc).__name__}}, status_code=500)
