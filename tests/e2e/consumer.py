"""A slow http sink consumer for the e2e suite, run as a native sidecar of the worker pods.

Each POST of a batch ({"records": [...]}) is appended to the file named by KCG_TEST_OUT, one
JSON line per record with the pod's name and the time received, then answered 200 after --delay seconds: a
consumer that answers slowly, so a worker stopped mid-stream has a batch in flight.

On SIGTERM it behaves like a well-behaved sidecar: it keeps serving until the requests in
flight are answered, then exits.

    python3 consumer.py --listen=127.0.0.1:9000 --delay=0.5
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

in_flight = 0
lock = threading.Lock()
idle = threading.Condition(lock)
out_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    delay = 0.0
    out = ""
    pod = ""

    def do_POST(self):
        global in_flight
        with lock:
            in_flight += 1
        try:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            records = body.get("records", [])
            with out_lock, open(self.out, "a", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps({"pod": self.pod, "at": time.time(), "record": r}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            time.sleep(self.delay)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        finally:
            with lock:
                in_flight -= 1
                idle.notify_all()

    def log_message(self, fmt, *args):
        sys.stderr.write("consumer: " + (fmt % args) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listen", default="127.0.0.1:9000")
    p.add_argument("--delay", type=float, default=0.5)
    a = p.parse_args()
    host, port = a.listen.rsplit(":", 1)
    Handler.delay = a.delay
    Handler.out = os.environ["KCG_TEST_OUT"]
    Handler.pod = os.environ.get("POD_NAME", "")
    server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
    server.daemon_threads = False

    def on_term(_signum, _frame):
        def drain():
            with lock:
                while in_flight > 0:
                    idle.wait()
            sys.stderr.write("consumer: SIGTERM, no request in flight: exiting\n")
            server.shutdown()

        sys.stderr.write("consumer: SIGTERM: finishing the requests in flight\n")
        threading.Thread(target=drain, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    sys.stderr.write(f"consumer: listening on {a.listen}, delay {a.delay}s\n")
    sys.stderr.flush()
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
