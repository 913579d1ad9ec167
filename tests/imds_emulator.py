#!/usr/bin/env python3
"""A small EC2 instance metadata service (IMDS) emulator for the VPC lab.

Runs inside the lab's router namespace, bound to 169.254.169.254:80 and, if
asked, [fd00:ec2::254]:80. Stdlib only.

The config file is JSON and is re-read on every request, so the lab can
change the metadata tree or the misbehaviour while the server runs:

    {
      "meta-data": {"mac": "02:00:00:00:00:01", "network": {...}},
      "behaviour": {
        "tokens": "required" | "optional" | "v1-only" | "refused",
        "delay": 0.0,                 # seconds before each answer
        "throttle_first": 0,          # 429 for the first N requests
        "mac_404_first": {"02:..": N}, # a MAC's paths 404 for its first N requests
        "drip": 0.0,                  # every answer sent one byte at a time, this many s apart
        "slow_headers": 0.0,          # seconds before each header line
        "endless_body": false         # a 200 whose body never ends (to GETs)
      }
    }

The "meta-data" tree maps names to strings (a file) or objects (a directory,
listed one name per line, subdirectories with a trailing "/"). An empty
string is a key the ENI does not have, like AWS's ipv6s on an ENI without
IPv6: answered with 404 and left out of its directory's listing. A value
{"huge": N} is answered with N bytes of junk.

"first N" counters restart whenever the behaviour section changes.
Every request is appended to the log file as one JSON line: method, path,
status, whether it had a token, the client address and port (one port per
connection), and how many connections were open while it was answered.
Connections are served concurrently, one thread each.
"""

import argparse
import http.server
import json
import secrets
import socket
import sys
import threading
import time

TOKEN_PATH = "/latest/api/token"
META_PREFIX = "/latest/meta-data"
MAX_TTL = 21600


class Emulator:
    """The shared state of all handler threads: config, tokens, counters."""

    def __init__(self, config_path, log_path):
        self.config_path = config_path
        self.log_path = log_path
        self.tokens = {}  # token -> expiry time
        self.lock = threading.Lock()
        self.behaviour_seen = None
        self.counters = {}
        self.connections = 0  # open now
        self.peak_connections = 0

    def load(self):
        with open(self.config_path) as f:
            config = json.load(f)
        behaviour = config.get("behaviour", {})
        with self.lock:
            if behaviour != self.behaviour_seen:
                self.behaviour_seen = behaviour
                self.counters = {}
        return config.get("meta-data", {}), behaviour

    def count(self, key):
        """How many requests were counted under KEY before this one."""
        with self.lock:
            seen = self.counters.get(key, 0)
            self.counters[key] = seen + 1
            return seen

    def connected(self, change):
        with self.lock:
            self.connections += change
            self.peak_connections = max(self.peak_connections, self.connections)

    def new_token(self, ttl):
        token = secrets.token_urlsafe(32)
        with self.lock:
            self.tokens[token] = time.monotonic() + ttl
        return token

    def token_valid(self, token):
        with self.lock:
            expiry = self.tokens.get(token)
        return expiry is not None and expiry > time.monotonic()

    def log(self, entry):
        with self.lock, open(self.log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def lookup(tree, path):
    """The tree node at PATH (below /latest/meta-data), or None."""
    node = tree
    for part in [p for p in path.split("/") if p]:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def render(node):
    """The body AWS would send for NODE, or None for a 404."""
    if node is None or node == "":
        return None
    if isinstance(node, dict) and set(node) == {"huge"}:
        return b"x" * int(node["huge"])
    if isinstance(node, dict):
        names = [k + "/" if isinstance(v, dict) and set(v) != {"huge"} else k
                 for k, v in node.items() if v != ""]
        return "\n".join(names).encode()
    return str(node).encode()


def mac_in(path):
    """The MAC address a .../macs/<mac>/... path is about, or None."""
    parts = path.split("/")
    if "macs" in parts:
        i = parts.index("macs")
        if i + 1 < len(parts) and parts[i + 1]:
            return parts[i + 1]
    return None


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "EC2ws"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms stall

    def log_message(self, *args):
        pass  # requests go to our JSON log instead

    def setup(self):
        super().setup()
        self.server.emulator.connected(+1)

    def finish(self):
        self.server.emulator.connected(-1)
        super().finish()

    def answer(self, status, body=b""):
        emulator = self.server.emulator
        emulator.log({  # before the answer: a client that has it finds it in the log
            "time": time.time(), "method": self.command, "path": self.path,
            "status": status, "token": bool(self.headers.get("X-aws-ec2-metadata-token")),
            "client": self.client_address[0], "port": self.client_address[1],
            "connections": emulator.connections,
        })
        _, behaviour = emulator.load()
        if any(behaviour.get(key) for key in ("drip", "slow_headers", "endless_body")):
            return self.answer_badly(status, body, behaviour)
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def answer_badly(self, status, body, behaviour):
        """The answer as a misbehaving IMDS sends it: a byte at a time, headers
        slowly, or a body without end (until the client goes, or 60 s)."""
        drip, slow = float(behaviour.get("drip", 0)), float(behaviour.get("slow_headers", 0))
        endless = behaviour.get("endless_body") and self.command == "GET"
        lines = ["HTTP/1.1 %d %s" % (status, self.responses.get(status, ("",))[0]),
                 "Server: EC2ws", "Content-Type: text/plain"]
        lines.append("Connection: close" if endless else "Content-Length: %d" % len(body))
        stop = time.monotonic() + 60
        try:
            for line in lines + [""]:
                time.sleep(slow)
                self.send_slowly((line + "\r\n").encode(), drip)
            self.send_slowly(body, drip)
            while endless and time.monotonic() < stop:  # 1.3 KB/s: 64 KiB take 50 s
                self.send_slowly(b"x" * 64, drip)
                time.sleep(0.05)
        except OSError:
            pass  # the client gave up
        self.close_connection = True

    def send_slowly(self, data, drip):
        if not drip:
            self.wfile.write(data)
            self.wfile.flush()
            return
        for index in range(len(data)):
            self.wfile.write(data[index:index + 1])
            self.wfile.flush()
            time.sleep(drip)

    def misbehaviour(self, behaviour):
        """The status code forced by the behaviour section, or None."""
        emulator = self.server.emulator
        time.sleep(float(behaviour.get("delay", 0)))
        if emulator.count("all") < int(behaviour.get("throttle_first", 0)):
            return 429
        mac = mac_in(self.path)
        first_n = behaviour.get("mac_404_first", {}).get(mac, 0) if mac else 0
        if first_n and emulator.count("mac " + mac) < int(first_n):
            return 404
        return None

    def do_PUT(self):
        emulator = self.server.emulator
        _, behaviour = emulator.load()
        forced = self.misbehaviour(behaviour)
        if forced:
            return self.answer(forced)
        if self.path != TOKEN_PATH:
            return self.answer(405)
        tokens = behaviour.get("tokens", "required")
        if tokens == "v1-only":
            return self.answer(405)
        if tokens == "refused":
            return self.answer(403)
        try:
            ttl = int(self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", ""))
        except ValueError:
            ttl = 0
        if not 1 <= ttl <= MAX_TTL:
            return self.answer(400)
        self.answer(200, emulator.new_token(ttl).encode())

    def do_GET(self):
        emulator = self.server.emulator
        tree, behaviour = emulator.load()
        forced = self.misbehaviour(behaviour)
        if forced:
            return self.answer(forced)
        token = self.headers.get("X-aws-ec2-metadata-token")
        tokens = behaviour.get("tokens", "required")
        if token is not None and tokens != "v1-only" and not emulator.token_valid(token):
            return self.answer(401)
        if token is None and tokens in ("required", "refused"):
            return self.answer(401)
        if not self.path.startswith(META_PREFIX):
            return self.answer(404)
        body = render(lookup(tree, self.path[len(META_PREFIX):]))
        if body is None:
            return self.answer(404)
        self.answer(200, body)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class Server6(Server):
    address_family = socket.AF_INET6


def serve(server_class, address, emulator):
    server = server_class((address, 80), Handler)
    server.emulator = emulator
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--ipv4", default="169.254.169.254")
    parser.add_argument("--ipv6", default=None, help="e.g. fd00:ec2::254")
    args = parser.parse_args()

    emulator = Emulator(args.config, args.log)
    emulator.load()  # fail early on a bad config
    serve(Server, args.ipv4, emulator)
    if args.ipv6:
        serve(Server6, args.ipv6, emulator)
    print("ready", flush=True)  # the lab waits for this line
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
