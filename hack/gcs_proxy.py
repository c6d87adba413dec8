"""A proxy in front of the GCS stand-in: the preconditions fake-gcs-server ignores, and the
faults a test or a soak needs at an exact moment of a writer's commit.

Preconditions: fake-gcs-server checks `ifGenerationMatch` on simple and multipart uploads only.
Cloud Storage also checks it when a resumable upload creates the object and on a delete; so does
this proxy: it remembers each resumable session's precondition and, on the request that
completes the upload (or on the delete), compares the object's current generation under a lock
that every write through the proxy takes, then forwards the request or answers 412 as Cloud
Storage does. Everything else passes through untouched.

Faults, each aimed by the written object's name (a `match(name)` predicate):
- `fail(match, status, methods)`: answer every request for such an object (by those HTTP
  methods: writes unless told) with `status` (503: the service is down for it).
- `damage(match, after)`: commit the next such write that completes an object, then answer with
  its reply cut to its first `after` bytes (a damaged body the client cannot parse).
- `drop_reply_to` (bytes): commit the next write whose body holds them, then drop the connection
  unanswered, as a reset after the commit would.
- `hold(match)`: keep the next write that `match(name, body)` picks from the service until
  `Hold.release` forwards or drops it: a moment that lasts as long as the caller needs (the
  fleet's faults aim at it).
"""

import http.client
import http.server
import json
import re
import sys
import threading
import urllib.parse

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}
OBJECT_PATH = re.compile(r"/b/([^/]+)/o/([^/?]+)$")
PRECONDITION_FAILED = {
    "error": {
        "code": 412,
        "message": "At least one of the pre-conditions you specified did not hold.",
        "errors": [{"reason": "conditionNotMet"}],
    }
}


class Hold:
    """One held write: `arrived` is set when it reaches the proxy; `release(forward)` lets it
    go on to the service (True) or drops its connection unanswered (False)."""

    def __init__(self, match):
        self.match = match
        self.arrived = threading.Event()
        self.released = threading.Event()
        self.forward = True
        self.name = None

    def release(self, forward: bool = True) -> None:
        self.forward = forward
        self.released.set()


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A client gone mid-request (a killed worker) is no error of the proxy's."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class GcsProxy:
    """proxy = GcsProxy(upstream_port); clients use proxy.url (proxy.env); proxy.close()."""

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.sessions = {}  # upload_id -> (bucket, object, generation or None)
        self.writes = threading.Lock()  # one write at a time, check and commit together
        self.refused = 0  # 412s the proxy answered
        self.failed = 0  # writes answered by `fail`
        self.damaged = 0  # replies cut by `damage`
        self.drop_reply_to = None
        self.failing = []  # (match, status)
        self.damaging = []  # (match, after)
        self.holds = []  # pending Holds
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                proxy.serve(self, write=False)

            def do_POST(self):
                proxy.serve(self, write=True)

            def do_PUT(self):
                proxy.serve(self, write=True)

            def do_DELETE(self):
                proxy.serve(self, write=True)

            def do_PATCH(self):
                proxy.serve(self, write=True)

            def log_message(self, *args):
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.env = {"STORAGE_EMULATOR_HOST": self.url}
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        for hold in list(self.holds):
            hold.release(False)
        self.server.shutdown()
        self.server.server_close()

    # -- faults -------------------------------------------------------------------------
    def fail(self, match, status: int = 503, methods=("POST", "PUT", "DELETE", "PATCH")) -> None:
        self.failing.append((match, status, methods))

    def damage(self, match, after: int = 64) -> None:
        self.damaging.append((match, after))

    def hold(self, match) -> Hold:
        hold = Hold(match)
        self.holds.append(hold)
        return hold

    # -- forwarding ---------------------------------------------------------------------
    def serve(self, handler, write: bool) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        url = urllib.parse.urlsplit(handler.path)
        query = urllib.parse.parse_qs(url.query)
        name = self.target(handler.command, url, query, body)
        method = handler.command
        status = next((s for m, s, ms in self.failing if name and m(name) and method in ms), None)
        if status is not None:
            self.failed += 1
            return self.answer(handler, status, {"error": {"code": status}})
        if not write:
            return self.forward(handler, body)
        if not self.held(name, body):
            handler.close_connection = True  # dropped, never answered
            return
        with self.writes:
            if query.get("uploadType") == ["resumable"] and "upload_id" not in query:
                return self.start_session(handler, body, url, query, name)
            completes = self.completes(handler, query)
            if not self.precondition_holds(handler.command, url, query, completes):
                self.refused += 1
                return self.answer(handler, 412, PRECONDITION_FAILED)
            if self.drop_reply_to and self.drop_reply_to in body:
                self.drop_reply_to = None
                self.request(handler.command, handler.path, body, handler.headers)
                handler.close_connection = True  # committed, never answered
                return
            aimed = [d for d in self.damaging if completes and name and d[0](name)]
            if aimed:
                self.damaging.remove(aimed[0])
                status, headers, data = self.request(
                    handler.command, handler.path, body, handler.headers
                )
                self.damaged += 1
                return self.reply(handler, status, headers, data[: aimed[0][1]])
            self.forward(handler, body)

    def held(self, name, body: bytes) -> bool:
        """Wait while a hold keeps this write; False when the hold drops it."""
        hold = next((h for h in self.holds if name and h.match(name, body)), None)
        if hold is None:
            return True
        self.holds.remove(hold)
        hold.name = name
        hold.arrived.set()
        hold.released.wait()
        return hold.forward

    def target(self, method: str, url, query: dict, body: bytes) -> str | None:
        """The object a request reads, creates, replaces or deletes (None when it names none)."""
        if "upload_id" in query:
            return (self.sessions.get(query["upload_id"][0]) or (None, None))[1]
        if "name" in query:
            return query["name"][0]
        if method in ("GET", "DELETE", "PATCH") and (found := OBJECT_PATH.search(url.path)):
            return urllib.parse.unquote(found.group(2))
        if found := re.search(rb'"name":\s*"((?:[^"\\]|\\.)*)"', body):
            return json.loads(b'"' + found.group(1) + b'"')
        return None

    def start_session(self, handler, body, url, query, name) -> None:
        status, headers, data = self.request(handler.command, handler.path, body, handler.headers)
        location = headers.get("Location", "")
        upload_id = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query).get("upload_id")
        if status == 200 and upload_id:
            bucket = re.search(r"/b/([^/]+)/o", url.path).group(1)
            expected = query.get("ifGenerationMatch")
            self.sessions[upload_id[0]] = (bucket, name, int(expected[0]) if expected else None)
        headers["Location"] = re.sub(r"^http://[^/]+", self.url, location)
        self.reply(handler, status, headers, data)

    def completes(self, handler, query: dict) -> bool:
        """Whether a write creates its object now: not a resumable chunk short of the end."""
        if "upload_id" not in query:
            return handler.command != "DELETE"
        content_range = handler.headers.get("Content-Range")
        return bool(content_range) and not content_range.endswith("/*")

    def precondition_holds(self, method: str, url, query: dict, completes: bool) -> bool:
        """The check fake-gcs-server leaves out: a resumable upload's, when it completes, and a
        delete's."""
        if "upload_id" in query and completes:
            bucket, name, expected = self.sessions.get(query["upload_id"][0]) or (0, 0, None)
        elif method == "DELETE" and "ifGenerationMatch" in query:
            bucket, name = OBJECT_PATH.search(url.path).groups()
            name, expected = urllib.parse.unquote(name), int(query["ifGenerationMatch"][0])
        else:
            return True
        return expected is None or self.generation(bucket, name) == expected

    def generation(self, bucket: str, name: str) -> int:
        path = f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}"
        status, _, data = self.request("GET", path, b"", {})
        return int(json.loads(data)["generation"]) if status == 200 else 0

    def forward(self, handler, body: bytes) -> None:
        self.reply(handler, *self.request(handler.command, handler.path, body, handler.headers))

    def request(self, method: str, path: str, body: bytes, headers) -> tuple:
        """The service's answer; 503 while it is unreachable (a restart of the stand-in)."""
        connection = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            connection.request(
                method,
                path,
                body=body,
                headers={k: v for k, v in dict(headers).items() if k.lower() not in HOP_HEADERS},
            )
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        except OSError:
            return 503, {"Content-Type": "application/json"}, b'{"error": {"code": 503}}'
        finally:
            connection.close()

    def answer(self, handler, status: int, payload: dict) -> None:
        self.reply(
            handler, status, {"Content-Type": "application/json"}, json.dumps(payload).encode()
        )

    @staticmethod
    def reply(handler, status: int, headers: dict, data: bytes) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            if key.lower() not in HOP_HEADERS:
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
