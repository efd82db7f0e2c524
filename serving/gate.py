"""The ASGI gate in front of every route: keys by path prefix, then a bounded body read.

Keys are checked here by prefix, so a new /v1, /admin or ops route cannot be added without them, and a
client without a key cannot make the server read or wait for its body. The body is then read whole,
under a size cap and a deadline, before the app sees it: uvicorn bounds neither the size of a chunked
body nor how slowly a body may trickle in (a slowloris client holds its request open for ever).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Coroutine, TypeVar

from starlette.requests import Request

from serving.auth import require_admin, require_ops, require_user
from serving.config import Keys
from serving.errors import APIError

T = TypeVar("T")
OPS_PATHS = ("/metrics", "/dashboard")  # and everything under /dashboard/


def is_ops_path(path: str) -> bool:
    return path in OPS_PATHS or path.startswith("/dashboard/")


class RequestGate:
    def __init__(self, app, *, keys: Keys, max_body_bytes: int, body_timeout_s: float):
        self.app, self.keys, self.ops_readers = app, keys, keys.ops_readers()
        self.max_body_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self._authorize(Request(scope))
            body = await self._read_body(scope, receive)
        except APIError as exc:
            return await exc.response()(scope, receive, send)
        except _ClientGone:
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # later calls wait for a disconnect, as streaming responses do
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _authorize(self, request: Request) -> None:
        path = request.url.path
        if path == "/v1" or path.startswith("/v1/"):
            require_user(request, self.keys.users)
        elif path == "/admin" or path.startswith("/admin/"):
            require_admin(request, self.keys.admin)
        elif is_ops_path(path):
            require_ops(request, self.ops_readers)

    async def _read_body(self, scope, receive) -> bytes:
        cap = self.max_body_bytes
        too_large = APIError(413, f"request body over {cap} bytes", code="body_too_large",
                             headers={"Connection": "close"})
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > cap):
            raise too_large
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGone
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > cap:  # a chunked body, or one longer than its Content-Length claimed
                        raise too_large
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise APIError(408, f"request body not received within {self.body_timeout_s:g} s",
                           code="body_timeout", headers={"Connection": "close"}) from None


class _ClientGone(Exception):
    pass


class ClientGone(Exception):
    """The client disconnected before its response started; its work was cancelled."""


async def cancel_on_disconnect(receive, work: Coroutine[Any, Any, T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (raises ClientGone then).

    uvicorn does not cancel a handler whose client left: without this, a request waiting in the
    queue or generating a whole reply runs on for nobody. `receive` is read only after the body,
    when the only message left is http.disconnect; the watcher stops before a response starts, so a
    streaming response can then listen for the disconnect itself."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled (shutdown): so is its work
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # its clean-up (engine abort, queue and slot release) runs before this returns
    raise ClientGone


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def bounded_h11(header_timeout_s: float):
    """uvicorn's h11 protocol with a deadline on the request line and headers.

    uvicorn closes idle keep-alive connections, but a client that trickles its headers a byte at a time
    holds a connection for ever; httptools (uvicorn's default parser) also buffers headers of any size.
    h11 caps their size (`h11_max_incomplete_event_size`, answered with a 400) and this adds the deadline."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderBoundedH11(H11Protocol):
        _deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self):
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # the request line and headers are in (or it failed)
                self._disarm()

        def on_response_complete(self):
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE:  # kept alive: the next request's headers get a new deadline
                self._arm()

        def send_400_response(self, msg: str):
            # What h11 cannot parse (headers over the cap, a malformed request line) in the API's error shape.
            body = APIError(400, "invalid HTTP request: malformed, or headers over the size limit",
                            code="invalid_http_request").response().body
            head = h11.Response(status_code=400, reason=b"Bad Request", headers=[
                (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), (b"connection", b"close")])
            for event in (head, h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def _arm(self):
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout_s, self._too_slow)

        def _disarm(self):
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self):
            self._deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                body = APIError(408, f"request headers not received within {header_timeout_s:g} s",
                                code="header_timeout").response().body
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                self.transport.close()

    return HeaderBoundedH11
