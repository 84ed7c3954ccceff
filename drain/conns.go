package drain

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"reflect"
	"runtime"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/inherit"
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
	// closing: closeTLS has set a past read deadline to end net/http's
	// read of this idle TLS connection (until undoCloseLocked); linger is
	// a duplicate of its socket, which outlives net/http's close so that
	// the close ends in stages (nil when dup(2) failed). Both under
	// Server.mu.
	closing bool
	linger  net.Conn
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
// (RFC 9112, section 9.3.1: clients retry idempotent ones). Such a
// request is served whole, when net/http read it before the close took
// effect, or not at all, and the close is in stages (lingerLocked): the
// client finds an orderly end (EOF before any response byte), not a
// reset.
func (s *Server) closeIdle(ck idleCheck, same bool) {
	s.mu.Lock()
	ok := s.conns[ck.c] == ck.info && ck.info.seq == ck.seq && s.idleCloseLocked(ck.c, ck.info)
	s.mu.Unlock()
	if !ok {
		return
	}
	switch c := ck.c.(type) {
	case *hconn:
		if s.arrived(ck, same) {
			return
		}
		// Its serve loop's read decides, under the connection's lock, with
		// net/http's buffer and the kernel's checked (hconn.ready).
		c.kick(true)
	case *tls.Conn:
		s.closeTLS(ck, c, same)
	}
}

// arrived reports whether the kernel has received bytes on ck's
// connection since its close was planned (only with same, and on TCP).
func (s *Server) arrived(ck idleCheck, same bool) bool {
	if !same || !ck.known {
		return false
	}
	n, known := received(ck.c)
	return !known || n != ck.received
}

// closeTLS closes an idle TLS connection by ending net/http's read of it
// with a read deadline in the past: net/http's serve loop then closes it
// itself (close_notify, then its socket). Closing the tls.Conn under that
// read instead would let the read take a request the client sends in the
// same instant and run its handler, whose response could never be
// written. The deadline does not stop a read that bytes reach before
// net/http's goroutine runs again (Go's poller lets readiness win): then
// net/http serves that request, whole, and closes after its response
// (undoCloseLocked). A duplicate of the socket keeps it open past
// net/http's close, so that track, at StateClosed, ends it in stages
// (lingerLocked).
func (s *Server) closeTLS(ck idleCheck, c *tls.Conn, same bool) {
	// Before the checks, so that as little as possible comes between the
	// last one and the close.
	dup, _ := dupConn(rawConn(c)) // nil if it fails: net/http's close is then the whole close
	s.mu.Lock()
	ok := !s.arrived(ck, same) && unread(rawConn(c)) == 0 &&
		s.conns[ck.c] == ck.info && ck.info.seq == ck.seq && !ck.info.closing
	if ok {
		if ck.info.linger == nil {
			ck.info.linger, dup = dup, nil
		}
		ck.info.closing = true
		c.SetReadDeadline(aLongTimeAgo)
	}
	s.mu.Unlock()
	if dup != nil {
		dup.Close() // not needed, or one from an earlier close serves
	}
	if ok {
		// The serve loop the deadline woke sends close_notify: let it run
		// now, not once the caller has gone through every other
		// connection of its batch, so that the client sees the close as
		// soon as can be.
		runtime.Gosched()
	}
}

// undoCloseLocked is for a TLS connection whose next request net/http
// read, header and all, before closeTLS's deadline could stop it: it is
// served after all, so the deadline goes back to the one net/http set
// once the header was in (ReadTimeout's, or none), before the handler can
// read the body. The duplicate stays: net/http closes after the response,
// and that close too ends in stages. s.mu is held.
func (s *Server) undoCloseLocked(c net.Conn, info *connInfo) {
	var d time.Time
	if t := s.srv.ReadTimeout; t > 0 {
		d = time.Now().Add(t)
	}
	c.SetReadDeadline(d)
	info.closing = false
}

// lingerTime bounds how long a connection closed in stages reads what its
// client still sends: net/http's figure for the same wait (its
// rstAvoidanceDelay), about a round trip around the planet.
var lingerTime = 500 * time.Millisecond

// lingerLocked closes c, an idle HTTP/1.1 connection net/http has let go
// of, in stages (RFC 9112, section 9.6). The caller has sent the FIN
// (closeWrite) on its own goroutine, net/http's closing one, so that the
// client sees it as soon as can be; lingerLocked then reads and discards
// until the client closes its side too, or s.linger has passed, and only
// then closes. A request the client sent before it saw the close meets an
// orderly end (close_notify, FIN: EOF before any response byte, which
// clients retry), not a reset: closing a socket that holds unread bytes
// sends RST instead of FIN, bytes that reach a closed one are answered
// with RST, and some TCP stacks let a reset overtake what the client has
// not read yet. The drain counts it open meanwhile. s.mu is held.
func (s *Server) lingerLocked(c net.Conn) {
	s.lingering++
	go func() {
		defer func() {
			s.mu.Lock()
			s.lingering--
			s.mu.Unlock()
			s.signalClosed()
		}()
		c.SetReadDeadline(time.Now().Add(s.linger))
		io.Copy(io.Discard, c)
		c.Close()
	}()
}

// closeWrite sends c's FIN (shutdown(2), SHUT_WR), the first stage of
// lingerLocked's close.
func closeWrite(c net.Conn) {
	if ic, ok := c.(*inherit.Conn); ok {
		c = ic.Conn
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
}

// dupConn returns a second net.Conn on c's socket (dup(2)); the socket
// stays open until both are closed.
func dupConn(c net.Conn) (net.Conn, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil, fmt.Errorf("drain: duplicate the socket of %s: no fd", c.RemoteAddr())
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("drain: duplicate the socket of %s: %w", c.RemoteAddr(), err)
	}
	fd, derr := -1, error(nil)
	if err := rc.Control(func(f uintptr) { fd, derr = unix.FcntlInt(f, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		derr = err
	}
	if derr != nil {
		return nil, fmt.Errorf("drain: duplicate the socket of %s: %w", c.RemoteAddr(), derr)
	}
	f := os.NewFile(uintptr(fd), "drain-linger")
	defer f.Close()
	d, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("drain: duplicate the socket of %s: %w", c.RemoteAddr(), err)
	}
	return d, nil
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
