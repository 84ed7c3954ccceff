package drain

import (
	"bufio"
	"context"
	"errors"
	"net"
	"net/http"
	"strings"
	"sync"
	"syscall"
)

// Connections the application owns: hijacked from a handler (WebSocket and
// the like) or tracked with Track. net/http forgets a connection once it is
// hijacked, and so does its Shutdown; the drain does not. It tells the
// application that the drain began (Started), waits for every such
// connection to be closed, and closes those still open at its deadline.
// The application decides what a drain means for its protocol: finish the
// session, close it politely, or hand it to the new generation with its
// state ((*inherit.Handoffs).Handoff).

// serverKey carries the serving *Server in a request's context.
type serverKey struct{}

// Started returns a channel that is closed when the drain of the Server
// serving the request whose context is ctx begins; nil (it never fires)
// for any other context. A handler that keeps a connection past its return
// (a hijacked WebSocket, a long poll) selects on it to end or hand off its
// session.
func Started(ctx context.Context) <-chan struct{} {
	if s, ok := ctx.Value(serverKey{}).(*Server); ok {
		return s.started
	}
	return nil
}

// Started returns a channel that is closed when the drain begins.
func (s *Server) Started() <-chan struct{} { return s.started }

// Hurried returns a channel that is closed when a second drain signal
// arrives during the drain: the process is to end what it can now
// (upgrader sends it to the oldest generation when more than
// --max-draining drain at once, and kills that generation 2 s later). An
// application closes its sessions politely then, rather than at its own
// pace.
func (s *Server) Hurried() <-chan struct{} { return s.hurried }

// Track makes the drain wait for c, a connection of the application's that
// net/http does not serve (one accepted from a handoff Listener, say), as
// it waits for hijacked ones: Serve returns only once the returned conn is
// closed, or closes it at the deadline. Close the returned conn, not c. It
// implements syscall.Conn when c does, so it can be handed off.
func (s *Server) Track(c net.Conn) net.Conn {
	ac := &appConn{Conn: c, s: s}
	s.mu.Lock()
	s.apps[ac] = struct{}{}
	s.mu.Unlock()
	return ac
}

// appConn is a connection the application owns.
type appConn struct {
	net.Conn
	s    *Server
	once sync.Once
}

// Close closes the connection and stops the drain waiting for it.
func (c *appConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		c.s.mu.Lock()
		delete(c.s.apps, c)
		c.s.mu.Unlock()
		c.s.signalClosed()
	})
	return err
}

// SyscallConn exposes the socket, for (*inherit.Handoffs).Handoff.
func (c *appConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, errors.New("drain: connection has no fd")
	}
	return sc.SyscallConn()
}

// CloseWrite half-closes, as *net.TCPConn does, when the connection can.
func (c *appConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.New("drain: connection cannot half-close")
}

// closeApps closes what the application still holds at the deadline.
func (s *Server) closeApps() {
	s.mu.Lock()
	open := make([]*appConn, 0, len(s.apps))
	for c := range s.apps {
		open = append(open, c)
	}
	s.mu.Unlock()
	for _, c := range open {
		c.Close()
	}
}

// Hijack implements http.Hijacker: the connection becomes the
// application's, and the drain waits for it (Track).
func (w *closeWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	h, ok := w.ResponseWriter.(http.Hijacker)
	if !ok {
		return nil, nil, errors.New("drain: the underlying ResponseWriter does not support hijacking")
	}
	c, rw, err := h.Hijack()
	if err != nil {
		return nil, nil, err
	}
	s := w.s
	if w.r.Method == "PRI" || strings.EqualFold(w.r.Header.Get("Upgrade"), "h2c") {
		s.h2cOnce.Do(func() {
			if s.opts.Logger != nil {
				s.opts.Logger.Warn("drain: a handler took over an h2c connection (golang.org/x/net/http2/h2c?): its HTTP/2 streams bypass the drain, which can only wait for the connection and close it at the deadline; use srv.Protocols.SetUnencryptedHTTP2(true) instead")
			}
		})
	}
	s.mu.Lock()
	ac, ok := s.hijacks[c] // registered by track, on StateHijacked
	delete(s.hijacks, c)
	s.mu.Unlock()
	if !ok {
		return s.Track(c), rw, nil
	}
	return ac, rw, nil
}
