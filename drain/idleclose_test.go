package drain

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A client that sends its next request in the instant the drain closes its
// idle connection has the request in flight when the server's close
// (close_notify, FIN) reaches it. The drain closes in stages (RFC 9112,
// section 9.6): its FIN first, then it reads and discards what the client
// sends until the client closes too or the linger ends, so that the
// racing request finds an orderly end (EOF before any response byte,
// which clients retry) and never a reset, and is never served. The client
// here writes its request once the server's FIN has arrived, unread, as a
// client does that has not looked yet.
func TestIdleCloseDiscardsRacingRequest(t *testing.T) {
	for _, tc := range []struct {
		name   string
		listen func(t *testing.T) net.Listener
		dial   func(t *testing.T, addr string) net.Conn
	}{
		{"tls", func(t *testing.T) net.Listener { return tlsListener(t, "http/1.1") },
			func(t *testing.T, addr string) net.Conn { return dialTLS(t, addr, "http/1.1") }},
		// Plain TCP with no handoff channel (systemd, standalone).
		{"plain", func(t *testing.T) net.Listener {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			return l
		}, func(t *testing.T, addr string) net.Conn {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			return c
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var served atomic.Int32
			srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				io.Copy(io.Discard, r.Body)
				served.Add(1)
			})}
			l := tc.listen(t)
			_, drain := serveOn(t, srv, l, Options{Timeout: 60 * time.Second, IdleGrace: 10 * time.Millisecond})
			c := tc.dial(t, l.Addr().String())
			br := bufio.NewReader(c)
			rawRequest(t, c, br, "/")
			raw := rawConn(c)

			drained := make(chan error, 1)
			go func() { drained <- drain() }()
			waitFor(t, "the server's FIN", func() bool { return tcpInfo(t, raw).State == unix.BPF_TCP_CLOSE_WAIT })
			before := tcpInfo(t, raw).Bytes_acked
			req := "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx"
			if _, err := io.WriteString(c, req); err != nil {
				t.Fatalf("writing the racing request: %v", err)
			}
			// The server's kernel either acknowledges the request (the
			// socket is still open, half-closed) or answers it with a
			// reset (closed).
			var info *unix.TCPInfo
			waitFor(t, "the request acknowledged or reset", func() bool {
				info = tcpInfo(t, raw)
				return info.State == unix.BPF_TCP_CLOSE || info.Bytes_acked > before
			})
			if info.State == unix.BPF_TCP_CLOSE {
				t.Fatal("the server reset the connection under the racing request; want it read and discarded")
			}
			c.SetReadDeadline(time.Now().Add(30 * time.Second))
			if n, err := br.Read(make([]byte, 1)); n != 0 || err != io.EOF {
				t.Fatalf("reading after the racing request: %d bytes, %v; want EOF before any response byte", n, err)
			}
			c.Close()
			if err := <-drained; err != nil {
				t.Fatal(err)
			}
			if n := served.Load(); n != 1 {
				t.Fatalf("the handler served %d requests, want 1: the racing one must not be served", n)
			}
		})
	}
}

// tcpInfo is c's TCP_INFO (tcp(7)).
func tcpInfo(t *testing.T, c net.Conn) *unix.TCPInfo {
	t.Helper()
	var info *unix.TCPInfo
	var err error
	control(c, func(fd uintptr) {
		info, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	})
	if err != nil || info == nil {
		t.Fatalf("TCP_INFO: %v", err)
	}
	return info
}
