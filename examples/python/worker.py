#!/usr/bin/env python3
"""Example upgrader worker in Python, standard library only.

It takes its listener from fd 3 (sd_listen_fds(3): LISTEN_FDS, LISTEN_PID),
sends READY=1 by hand to $NOTIFY_SOCKET (sd_notify(3)), and on SIGTERM drains:
it stops accepting, finishes the requests in flight, and exits 0.

It also takes live HTTP connections handed off by a draining worker of the
previous generation, on $UPGRADER_HANDOFF_FD, speaking the protocol of
docs/reference/handoff.md by hand: that is the proof that the wire format needs no Go.

Run under upgrader:  upgrader -l 127.0.0.1:8080 -- python3 examples/python/worker.py
Run alone:           python3 examples/python/worker.py  (binds 127.0.0.1:8080)
"""

import array
import http.server
import os
import signal
import socket
import socketserver
import struct
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


MAGIC = b"UPGRADER/1 "
MAX_MESSAGE = 192 << 10
MAX_FDS = 253
# socket(7): the kernel stamps each message as it is queued (Python's socket
# module names neither constant; the values are Linux's generic ones).
SO_TIMESTAMPNS = SCM_TIMESTAMPNS = 35
# A HANDOFF that waited longer than this in our socket is refused: its sender
# takes back what has no answer within 5 s (docs/reference/handoff.md).
LATE_HANDOFF = 1.0


def handoff_channel():
    """The handoff channel, announced as taking kind http; None if absent."""
    v = os.environ.get("UPGRADER_HANDOFF_FD")
    if not v:
        return None
    ch = socket.socket(fileno=int(v))  # AF_UNIX, SOCK_SEQPACKET
    ch.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    ch.send(MAGIC + b"ACCEPT kinds=http\n")
    return ch


def parse_handoff(msg, nfds):
    """Parse a HANDOFF message; raise ValueError naming what is wrong."""
    head, _, rest = msg.partition(b"\n")
    if not head.startswith(MAGIC + b"HANDOFF "):
        raise ValueError(f"not a HANDOFF: {head[:60]!r}")
    fields = dict(kv.split(b"=", 1) for kv in head[len(MAGIC) + 8:].split())
    msg_id, kind, n = int(fields[b"id"]), fields[b"kind"].decode(), int(fields[b"n"])
    if n != nfds:
        raise ValueError(f"n={n} but {nfds} fds came with the message")
    conns = []
    for _ in range(n):
        line, _, rest = rest.partition(b"\n")
        st, bu = (int(x.split(b"=")[1]) for x in line.split())
        conns.append((st, bu))
    return msg_id, kind, conns


def receive_handoffs(ch, server):
    """Take handed-off connections as if accepted; ACK or NAK each batch."""
    while True:
        try:
            # Room for the fds and the arrival stamp beside them.
            space = socket.CMSG_SPACE(MAX_FDS * 4) + socket.CMSG_SPACE(16)
            msg, anc, _, _ = ch.recvmsg(MAX_MESSAGE + 1, space)
        except OSError:
            return
        if not msg and not anc:
            return  # upgrader went away
        fds = array.array("i")
        waited = 0.0
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            elif level == socket.SOL_SOCKET and typ == SCM_TIMESTAMPNS and len(data) >= 16:
                sec, nsec = struct.unpack("qq", data[:16])
                waited = time.time() - (sec + nsec / 1e9)
        if not msg.startswith(MAGIC + b"HANDOFF "):
            for fd in fds:
                os.close(fd)
            continue  # ACK/NAK for batches we never send
        try:
            msg_id, kind, conns = parse_handoff(msg, len(fds))
        except (ValueError, KeyError, IndexError) as e:
            print(f"python worker: malformed handoff message: {e}", file=sys.stderr)
            for fd in fds:
                os.close(fd)
            continue
        # Refuse what this simple worker cannot resume: another kind, bytes
        # the sender had already read, or a drain under way. The sender
        # keeps those connections.
        if kind != "http" or any(bu for _, bu in conns) or Handler.draining:
            for fd in fds:
                os.close(fd)
            ch.send(MAGIC + f"NAK id={msg_id} reason=python worker cannot take these\n".encode())
            continue
        if waited > LATE_HANDOFF:
            for fd in fds:
                os.close(fd)
            ch.send(MAGIC + f"NAK id={msg_id} reason=waited {waited:.3f}s in the queue\n".encode())
            continue
        for fd in fds:
            sock = socket.socket(fileno=fd)
            sock.setblocking(True)
            try:
                addr = sock.getpeername()
            except OSError:
                addr = ("", 0)
            server.process_request(sock, addr)
        ch.send(MAGIC + f"ACK id={msg_id}\n".encode())


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

    # The handler only sets a flag. Python runs it in the main thread
    # between two bytecodes, possibly while socketserver holds threading's
    # internal lock to start a request thread; a handler that started a
    # thread itself (as server.shutdown() from a handler needs) would
    # deadlock there, with the connection just accepted never answered.
    stop = []

    def drain(signum, frame):
        stop.append(signum)
        Handler.draining = True

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    ch = handoff_channel()
    if ch is not None:
        threading.Thread(target=receive_handoffs, args=(ch, server), daemon=True).start()
    sd_notify("READY=1")
    server.timeout = 0.05
    while not stop:
        server.handle_request()  # one accept, or 50 ms without one
    sd_notify("STOPPING=1")
    # Stop accepting; the socket stays open in the supervisor, so connections
    # queued on it go to the next generation. Then finish what is in flight.
    server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
