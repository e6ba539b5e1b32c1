"""What every request passes before the app reads a byte of its body (an ASGI middleware).

FastAPI reads and parses a body before it runs the route's dependencies, so both the size limit and the
token must be checked here, on the headers and on the bytes as they arrive:

- a request that would change something (any method but GET and HEAD: every such route needs at least a
  submit token) is answered 401/403 from its Authorization header alone, its body never read;
- a Content-Length over the limit is answered 413 at once; a body without one (chunked) is counted as it
  arrives and refused with 413 as soon as it passes the limit. What was read is dropped; the answer closes
  the connection, so the rest is never read either (a client sending `Expect: 100-continue` sends none).

Answers are JSON {"detail": ...} like the app's own errors.
"""
import json

from core.errors import QuantfarmError

SAFE_METHODS = (b"GET", b"HEAD")


class BodyTooLarge(QuantfarmError):
    """A request body over the server's limit (413)."""


class RequestGate:
    def __init__(self, app, auth, max_body: int, status, role: str = "submit"):
        """`auth`: the server's Auth; `status`: error -> HTTP status (api.http_status); `role`: what a request
        with a method other than GET or HEAD needs before its body is read."""
        self.app, self.auth, self.max_body, self.status, self.role = app, auth, max_body, status, role

    def too_large(self) -> BodyTooLarge:
        return BodyTooLarge(f"request body over the server's limit of {self.max_body} bytes "
                            f"({self.max_body / 2 ** 20:g} MiB); send a smaller request")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if scope["method"].encode() not in SAFE_METHODS:
            try:
                self.auth.check(headers.get(b"authorization", b"").decode("latin-1") or None, self.role)
            except QuantfarmError as e:
                return await self.refuse(send, e)
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await self.refuse(send, QuantfarmError("Content-Length must be a whole number of bytes"))
            if int(length) > self.max_body:
                return await self.refuse(send, self.too_large())

        seen, over, refused, started = 0, False, False, False

        async def counted_receive():
            nonlocal seen, over, refused
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    over = True              # the app sees a client that went away
                    if not started:          # and its own answer (to a vanished client) is dropped
                        refused = True
                        await self.refuse(send, self.too_large())
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted_receive, guarded_send)

    async def refuse(self, send, error: QuantfarmError):
        status = self.status(error)
        body = json.dumps({"detail": str(error)}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]             # the unread rest of the body is never read
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
