package drain

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"reflect"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// What the drain does with each kind of connection (docs/draining.md has
// the table):
//
//   - idle HTTP/1.1 on a plain socket, with a handoff channel: handed to
//     the new generation (handoff.go);
//   - HTTP/1.1 with a request in flight, or whose next request net/http
//     has begun to read: "Connection: close" on its next response;
//   - HTTP/2 (TLS, or net/http's own h2c): GOAWAY to every connection when
//     the drain begins, and on any response written during it;
//   - idle HTTP/1.1 that cannot be handed off (TLS, or no channel): closed
//     once it has stayed idle for Options.IdleGrace with not a byte of a
//     next request arrived, or at once on a second drain signal;
//   - hijacked, or Track'ed: the application's (appconn.go).

// connInfo is what the drain knows of one connection net/http serves.
type connInfo struct {
	state http.ConnState // under Server.mu
	// seq counts state reports (under Server.mu): a close planned in one
	// idle period can tell it is still the same one.
	seq uint64
	// What the requests on it were, set by the handler wrapper: a
	// connection is HTTP/1.x only once it has served an HTTP/1.x request.
	http1, h2 atomic.Bool
}

// infoKey carries a connection's *connInfo in its requests' contexts.
type infoKey struct{}

// register returns c's record, creating it: from ConnContext, which
// net/http calls for each accepted connection before its StateNew, and
// from giveBack. s.mu is held.
func (s *Server) registerLocked(c net.Conn) *connInfo {
	if info, ok := s.conns[c]; ok {
		return info
	}
	info := new(connInfo)
	if hc, ok := c.(*hconn); ok {
		info = hc.info
	}
	info.state = http.StateNew
	s.conns[c] = info
	return info
}

// idleCloseLocked reports whether c is an idle connection that neither a
// handoff nor a "Connection: close" can end: HTTP/1.x, between requests,
// on TLS or with no handoff. HTTP/2 ones get GOAWAY instead; a TLS one
// still in its handshake is left alone (its protocol is not known yet).
// s.mu is held.
func (s *Server) idleCloseLocked(c net.Conn, info *connInfo) bool {
	if info.h2.Load() || (info.state != http.StateIdle && info.state != http.StateNew) {
		return false
	}
	switch c := c.(type) {
	case *hconn:
		// One that cannot be taken (noHandoff) but turned idle all the
		// same (its Connection: close was decided before net/http took
		// the byte that ruled out the takeover) closes as well.
		return !s.handoffOn.Load() || !c.handable()
	case *tls.Conn:
		return info.http1.Load()
	}
	return false
}

// idleCheck is a planned closeIdle: the connection, its idle period, and
// how many bytes the kernel had received on it then.
type idleCheck struct {
	c        net.Conn
	info     *connInfo
	seq      uint64
	received uint64
	known    bool // received was read (TCP only)
}

func (s *Server) planIdleClose(checks []idleCheck, grace time.Duration) {
	select {
	case <-s.hurried:
		// After a second drain signal what goes idle closes at once, as
		// hurry closed what was idle then: a connection whose response
		// was written just before hurry, but which net/http reported
		// idle only after it, is one.
		grace = 0
	default:
	}
	if grace < 0 {
		return // left to the deadline
	}
	for i := range checks {
		checks[i].received, checks[i].known = received(checks[i].c)
	}
	time.AfterFunc(grace, func() {
		for _, ck := range checks {
			s.closeIdle(ck, true)
		}
	})
}

// closeIdle closes ck's connection if it is still in the same idle period
// and no byte of a next request has arrived, so that the close cannot cut
// a request the client has begun to send (with same set, the kernel's
// count of received bytes must not have moved either). What remains is
// the race every HTTP/1.1 server closing an idle connection has: a
// request sent in the microseconds before the client sees the close
// (RFC 9112, section 9.3.1: clients retry idempotent ones).
func (s *Server) closeIdle(ck idleCheck, same bool) {
	s.mu.Lock()
	ok := s.conns[ck.c] == ck.info && ck.info.seq == ck.seq && s.idleCloseLocked(ck.c, ck.info)
	s.mu.Unlock()
	if !ok {
		return
	}
	if same && ck.known {
		if n, known := received(ck.c); !known || n != ck.received {
			return
		}
	}
	switch c := ck.c.(type) {
	case *hconn:
		// Its serve loop's read decides, under the connection's lock, with
		// net/http's buffer and the kernel's checked (hconn.ready).
		c.kick(true)
	case *tls.Conn:
		if unread(c.NetConn()) == 0 {
			c.Close() // close_notify, then the socket; net/http's read ends
		}
	}
}

// idleConns lists the connections closeIdle may close now.
func (s *Server) idleConns() []idleCheck {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []idleCheck
	for c, info := range s.conns {
		if s.idleCloseLocked(c, info) {
			out = append(out, idleCheck{c: c, info: info, seq: info.seq})
		}
	}
	return out
}

// hurry is the second drain signal: what is idle closes now, and HTTP/2
// connections are told GOAWAY again.
func (s *Server) hurry() {
	s.hurryOnce.Do(func() { close(s.hurried) })
	s.goAway()
	for _, ck := range s.idleConns() {
		s.closeIdle(ck, false)
	}
}

// rawConn returns the socket beneath c's TLS and drain wrappers.
func rawConn(c net.Conn) net.Conn {
	for {
		switch x := c.(type) {
		case *tls.Conn:
			c = x.NetConn()
		case *hconn:
			c = x.Conn
		default:
			return c
		}
	}
}

// unread returns how many bytes the kernel holds unread on c's socket
// (SIOCINQ, tcp(7) and unix(7)); 1 when it cannot tell, so that a caller
// that must not drop bytes does not close.
func unread(c net.Conn) int {
	n := 1
	control(c, func(fd uintptr) {
		if v, err := unix.IoctlGetInt(int(fd), unix.SIOCINQ); err == nil {
			n = v
		}
	})
	return n
}

// received returns how many bytes c's TCP socket has received in all
// (tcpi_bytes_received, tcp(7) TCP_INFO); known is false for other
// sockets.
func received(c net.Conn) (n uint64, known bool) {
	control(c, func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			n, known = info.Bytes_received, true
		}
	})
	return n, known
}

func control(c net.Conn, f func(fd uintptr)) {
	sc, ok := rawConn(c).(syscall.Conn)
	if !ok {
		return
	}
	if rc, err := sc.SyscallConn(); err == nil {
		rc.Control(f)
	}
}

// HTTP/2. net/http sends GOAWAY to its HTTP/2 connections only from
// Shutdown, which also closes idle HTTP/1.1 connections under their
// clients; and on a response that says "Connection: close", which an idle
// connection never writes. So the drain serves HTTP/2 through a second,
// connection-less http.Server's HTTP/2 implementation (net/http's own,
// configured the same way), whose Shutdown reaches the HTTP/2
// connections only. Requests still go to srv (it is the BaseConfig), so
// nothing else changes. An application that set srv.TLSNextProto itself
// (x/net's http2.ConfigureServer, or HTTP/2 off) keeps its choice: its
// idle HTTP/2 connections then last until the deadline.

// setupHTTP2 installs the GOAWAY-capable HTTP/2 server in srv.
func (s *Server) setupHTTP2() {
	srv := s.srv
	if srv.TLSNextProto != nil {
		return
	}
	h2 := &http.Server{Protocols: srv.Protocols, IdleTimeout: srv.IdleTimeout,
		ReadTimeout: srv.ReadTimeout, ErrorLog: srv.ErrorLog}
	h2.Serve(noListener{}) // configures h2.TLSNextProto, then returns
	if len(h2.TLSNextProto) == 0 {
		return // HTTP/2 is off (Protocols, GODEBUG)
	}
	srv.TLSNextProto = make(map[string]func(*http.Server, *tls.Conn, http.Handler), len(h2.TLSNextProto))
	for proto, serve := range h2.TLSNextProto {
		srv.TLSNextProto[proto] = func(hs *http.Server, c *tls.Conn, h http.Handler) {
			s.markH2(c)
			serve(hs, c, h)
		}
	}
	s.h2 = h2
}

// markH2 records that c, or the plain connection net/http's h2c path
// carries in it, is served as HTTP/2: never taken, never idle-closed.
func (s *Server) markH2(c *tls.Conn) {
	var key net.Conn = c
	if u, ok := c.NetConn().(interface{ UnencryptedNetConn() net.Conn }); ok {
		key = u.UnencryptedNetConn()
	}
	s.mu.Lock()
	info := s.conns[key]
	s.mu.Unlock()
	if info != nil {
		info.h2.Store(true)
	}
}

// goAway tells every HTTP/2 connection GOAWAY: no new stream; it closes
// once its streams are done.
func (s *Server) goAway() {
	if s.h2 != nil {
		s.h2.Shutdown(context.Background()) // it has no connection of its own to wait for
	}
}

// noListener is closed from the start.
type noListener struct{}

func (noListener) Accept() (net.Conn, error) { return nil, net.ErrClosed }
func (noListener) Close() error              { return nil }
func (noListener) Addr() net.Addr            { return fallbackAddr{} }

// errXNetH2C is Serve's answer to golang.org/x/net/http2/h2c's handler.
var errXNetH2C = errors.New("drain: srv.Handler is golang.org/x/net/http2/h2c's handler, whose HTTP/2 streams bypass the drain " +
	"(no GOAWAY, no Connection: close, and connections it never reports closed): " +
	"serve h2c with net/http's own support instead, srv.Protocols.SetUnencryptedHTTP2(true) (Go 1.24+)")

// checkHandler refuses what the drain cannot drain.
func checkHandler(h http.Handler) error {
	t := reflect.TypeOf(h)
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t != nil && t.PkgPath() == "golang.org/x/net/http2/h2c" {
		return errXNetH2C
	}
	return nil
}
