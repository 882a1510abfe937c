"""A stand-in for a service container on the doctor's test rig (tests/helpers/doctor-stubs.ts), which has no registry
to pull the real images from. Serves canned HTTP answers and SSH banners on the ports the real service listens on,
so that what the doctor asks (a route through Traefik, a health endpoint, a metrics page, an SSH banner) gets the
answer the real one would give. Optionally records every request (one JSON line each) to a file.

Usage: python3 doctor-stub.py '<spec JSON>'
  {"http": [{"port": 80, "routes": {"/path": [status, "content type", "body"]}, "prefix": {"/bot": [...]},
             "default": [status, "content type", "body"], "record": "/rec/requests.jsonl"}],
   "banner": [{"port": 22, "text": "SSH-2.0-..."}]}
"""
import json
import signal
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SPEC = json.loads(sys.argv[1])
# as PID 1 of its container it gets no default SIGTERM action: `docker stop` would wait, then SIGKILL
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def http_handler(spec):
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def answer(self):
            body_in = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if self.command == "POST" else b""
            path = self.path.split("?", 1)[0]
            status, ctype, body = spec.get("routes", {}).get(path) or next(
                (v for k, v in spec.get("prefix", {}).items() if path.startswith(k)), None
            ) or spec.get("default", [404, "text/plain", "404 page not found\n"])
            if spec.get("record"):
                with lock, open(spec["record"], "a") as f:
                    f.write(json.dumps({"method": self.command, "path": self.path, "host": self.headers.get("Host"), "body": body_in.decode("utf8", "replace")}) + "\n")
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = answer
        do_POST = answer

        def log_message(self, *args):
            pass

    return Handler


def banner_handler(text):
    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.sendall(text.encode())

    return Handler


class Banner(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True


servers = [ThreadingHTTPServer(("0.0.0.0", s["port"]), http_handler(s)) for s in SPEC.get("http", [])]
servers += [Banner(("0.0.0.0", b["port"]), banner_handler(b["text"])) for b in SPEC.get("banner", [])]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
if servers:
    servers[0].serve_forever()
else:
    threading.Event().wait()
