"""A proxy in front of the GCS stand-in that adds the one precondition this project relies on
and fake-gcs-server ignores: `ifGenerationMatch` on a resumable upload (the client's way for
objects over 8 MiB, so most stems of real tracks).

Cloud Storage checks the precondition when the upload creates the object; so does this proxy:
it remembers each session's precondition and, on the request that completes the upload,
compares the object's current generation under a lock that every write through the proxy
takes, then forwards the request or answers 412 as Cloud Storage does. Everything else passes
through untouched. `drop_reply_to` (bytes) makes the proxy commit the next write whose body
holds them and then drop the connection unanswered, as a reset after the commit would.
"""

import http.client
import http.server
import json
import re
import threading
import urllib.parse

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


class PreconditionProxy:
    """proxy = PreconditionProxy(upstream_port); clients use proxy.url; proxy.close()."""

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.sessions = {}  # upload_id -> (bucket, object, generation)
        self.writes = threading.Lock()  # one write at a time, check and commit together
        self.refused = 0
        self.drop_reply_to = None
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

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- forwarding ---------------------------------------------------------------------
    def serve(self, handler, write: bool) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        url = urllib.parse.urlsplit(handler.path)
        query = urllib.parse.parse_qs(url.query)
        if not write:
            return self.forward(handler, body)
        with self.writes:
            if query.get("uploadType") == ["resumable"] and "upload_id" not in query:
                return self.start_session(handler, body, url, query)
            session = self.sessions.get((query.get("upload_id") or [None])[0])
            if session is not None and self.completes(handler.headers.get("Content-Range")):
                bucket, name, expected = session
                if self.generation(bucket, name) != expected:
                    self.refused += 1
                    return self.answer(
                        handler,
                        412,
                        {
                            "error": {
                                "code": 412,
                                "message": "At least one of the pre-conditions you "
                                "specified did not hold.",
                                "errors": [{"reason": "conditionNotMet"}],
                            }
                        },
                    )
            if self.drop_reply_to and self.drop_reply_to in body:
                self.drop_reply_to = None
                self.request(handler.command, handler.path, body, handler.headers)
                handler.close_connection = True  # committed, never answered
                return
            self.forward(handler, body)

    def start_session(self, handler, body, url, query) -> None:
        status, headers, data = self.request(handler.command, handler.path, body, handler.headers)
        location = headers.get("Location", "")
        upload_id = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query).get("upload_id")
        if status == 200 and upload_id and "ifGenerationMatch" in query:
            bucket = re.search(r"/b/([^/]+)/o", url.path).group(1)
            name = query.get("name", [None])[0] or json.loads(body or b"{}").get("name")
            self.sessions[upload_id[0]] = (bucket, name, int(query["ifGenerationMatch"][0]))
        headers["Location"] = re.sub(r"^http://[^/]+", self.url, location)
        self.reply(handler, status, headers, data)

    @staticmethod
    def completes(content_range: str | None) -> bool:
        """Whether a chunk's Content-Range names the total size (the last chunk)."""
        return bool(content_range) and not content_range.endswith("/*")

    def generation(self, bucket: str, name: str) -> int:
        path = f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}"
        status, _, data = self.request("GET", path, b"", {})
        return int(json.loads(data)["generation"]) if status == 200 else 0

    def forward(self, handler, body: bytes) -> None:
        self.reply(handler, *self.request(handler.command, handler.path, body, handler.headers))

    def request(self, method: str, path: str, body: bytes, headers) -> tuple:
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
