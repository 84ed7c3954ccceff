#!/usr/bin/env python3
"""Example upgrader worker in Python, standard library only.

It takes its listener from fd 3 (sd_listen_fds(3): LISTEN_FDS, LISTEN_PID),
sends READY=1 by hand to $NOTIFY_SOCKET (sd_notify(3)), and on SIGTERM drains:
it stops accepting, finishes the requests in flight, and exits 0.

Run under upgrader:  upgrader -l 127.0.0.1:8080 -- python3 examples/python/worker.py
Run alone:           python3 examples/python/worker.py  (binds 127.0.0.1:8080)
"""

import http.server
import os
import signal
import socket
import socketserver
import sys
import threading
import time

SD_LISTEN_FDS_START = 3


def inherited_socket():
    """The first inherited listener, or None when not socket-activated."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    n = int(os.environ.get("LISTEN_FDS", "0"))
    for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(k, None)
    if n < 1:
        return None
    # socket() with fileno= detects family and type from the fd itself.
    return socket.socket(fileno=SD_LISTEN_FDS_START)


def sd_notify(state):
    """Send state to $NOTIFY_SOCKET; a no-op without it."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        s.sendall(state.encode())


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    draining = False

    def _reply(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        pid, gen = str(os.getpid()), os.environ.get("UPGRADER_GENERATION", "0")
        body = f"hello from python pid {pid} generation {gen}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Pid", pid)
        self.send_header("X-Generation", gen)
        if Handler.draining:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    do_GET = _reply
    do_POST = _reply

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = False  # server_close() joins the request threads
    block_on_close = True


def main():
    sock = inherited_socket()
    if sock is None:
        server = Server(("127.0.0.1", 8080), Handler)
    else:
        server = Server(sock.getsockname(), Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock

    def drain(signum, frame):
        sd_notify("STOPPING=1")
        Handler.draining = True
        # shutdown() waits for serve_forever to return: not from its thread.
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    sd_notify("READY=1")
    server.serve_forever(poll_interval=0.05)
    # Stop accepting; the socket stays open in the supervisor, so connections
    # queued on it go to the next generation. Then finish what is in flight.
    server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
