package drain

import (
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"

	"github.com/seed6cb0314a/upgrader/inherit"
	"github.com/seed6cb0314a/upgrader/internal/handoff"
)

// How idle HTTP/1.1 connections are taken from net/http without losing a
// byte.
//
// Every accepted connection is wrapped in an hconn. When the drain begins,
// and whenever a connection turns idle during the drain, the hconn is
// "kicked": its read deadline is moved to the past, which wakes net/http's
// pending read. That read (or the next one) fails with errTakenOver, which
// makes net/http drop the connection and call Close, which the hconn turns
// into a handoff instead of a close; but only when net/http provably holds
// none of the connection's bytes:
//
//   - the connection is idle or new (ConnState) and no byte was returned to
//     net/http since, so no next request has begun;
//   - net/http asks for a whole 4096-byte buffer, which it does only when
//     its bufio.Reader is empty (it asks for less when it holds some bytes).
//
// Otherwise the kick is undone (net/http's own deadline is restored) and
// the read goes on: the request is served here, and the connection is
// taken when it next turns idle.

// httpReadBuffer is net/http's bufio.Reader size for connections.
const httpReadBuffer = 4096

// errTakenOver is what net/http's read gets at a takeover. It must be
// io.EOF: net/http drops a connection silently on EOF, but answers other
// errors on a new connection with "400 Bad Request".
var errTakenOver = io.EOF

// aLongTimeAgo is a deadline in the past, as net/http uses to abort reads.
var aLongTimeAgo = time.Unix(1, 0)

type hconn struct {
	net.Conn
	s *Server

	mu           sync.Mutex
	delivered    int64 // bytes returned to net/http
	idleMark     int64 // delivered when it last turned idle
	idle         bool  // StateIdle, or StateNew: between requests
	want         bool  // a takeover is asked for
	kicked       bool  // our deadline is set, not net/http's
	httpDeadline time.Time
	taken        bool // Read refused net/http: Close hands off
}

// eligible reports whether net/http holds none of c's bytes, for a read
// of n bytes. c.mu is held.
func (c *hconn) eligible(n int) bool {
	return c.idle && n == httpReadBuffer && c.delivered == c.idleMark
}

func (c *hconn) Read(p []byte) (int, error) {
	for {
		c.mu.Lock()
		if c.want && c.eligible(len(p)) {
			c.taken = true
			c.mu.Unlock()
			return 0, errTakenOver
		}
		c.mu.Unlock()
		n, err := c.Conn.Read(p)
		c.mu.Lock()
		c.delivered += int64(n)
		if c.kicked {
			var ne net.Error
			if n == 0 && errors.As(err, &ne) && ne.Timeout() && c.want && c.eligible(len(p)) {
				c.taken = true
				c.mu.Unlock()
				return 0, errTakenOver
			}
			// Bytes came first, or net/http holds some: serve it here.
			c.kicked, c.want = false, false
			c.Conn.SetReadDeadline(c.httpDeadline)
			if n == 0 && errors.As(err, &ne) && ne.Timeout() {
				c.mu.Unlock()
				continue // our own deadline, not net/http's
			}
		}
		c.mu.Unlock()
		return n, err
	}
}

func (c *hconn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.httpDeadline = t
	if c.kicked {
		return nil // restored when the kick is undone
	}
	return c.Conn.SetReadDeadline(t)
}

func (c *hconn) SetDeadline(t time.Time) error {
	if err := c.SetReadDeadline(t); err != nil {
		return err
	}
	return c.Conn.SetWriteDeadline(t)
}

// kick asks for a takeover of an idle connection.
func (c *hconn) kick() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.idle || c.taken || c.want {
		return
	}
	c.want, c.kicked = true, true
	c.Conn.SetReadDeadline(aLongTimeAgo)
}

func (c *hconn) setIdle(idle bool) {
	c.mu.Lock()
	c.idle = idle
	if idle {
		c.idleMark = c.delivered
	}
	c.mu.Unlock()
}

// Close hands the connection off when Read refused it to net/http.
func (c *hconn) Close() error {
	c.mu.Lock()
	taken := c.taken
	c.mu.Unlock()
	if taken {
		c.s.takenConn(c)
		return nil
	}
	return c.Conn.Close()
}

// ReadFrom passes net/http's response copies (http.FileServer, io.Copy to
// a ResponseWriter) straight to the socket's own ReadFrom, which uses
// sendfile(2) or splice(2) for files and pipes: without it every byte would
// cross user space in 32 KiB writes. It is the write side, so it needs none
// of Read's takeover bookkeeping, and takes no lock.
func (c *hconn) ReadFrom(r io.Reader) (int64, error) {
	w := c.Conn
	if ic, ok := w.(*inherit.Conn); ok {
		// A handed-off connection: its wrapper only buffers reads, so
		// writes may go to the socket beneath it.
		w = ic.Conn
	}
	if rf, ok := w.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(writerOnly{w}, r)
}

// writerOnly hides a writer's ReadFrom, so that io.Copy cannot call back
// into it.
type writerOnly struct{ io.Writer }

// CloseWrite lets net/http half-close before closing, as it does for a
// *net.TCPConn, so that a client's unread bytes do not turn into a reset.
func (c *hconn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// SyscallConn exposes the fd for handoff.
func (c *hconn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, errors.New("drain: connection has no fd")
	}
	return sc.SyscallConn()
}

// reset makes a connection that came back from a refused handoff a plain
// one again, to be served here.
func (c *hconn) reset() {
	c.mu.Lock()
	c.taken, c.want, c.kicked, c.idle = false, false, false, false
	c.Conn.SetReadDeadline(c.httpDeadline)
	c.mu.Unlock()
}

// handoffListener wraps accepted connections in hconns.
type handoffListener struct {
	net.Listener
	s *Server
}

func (l handoffListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	if _, ok := c.(syscall.Conn); !ok {
		return c, nil // TLS and other wrappers: not handed off
	}
	return &hconn{Conn: c, s: l.s}, nil
}

// fallbackListener feeds connections whose handoff was refused back to this
// worker's own http.Server.
type fallbackListener struct {
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func (l *fallbackListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *fallbackListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *fallbackListener) Addr() net.Addr { return fallbackAddr{} }

type fallbackAddr struct{}

func (fallbackAddr) Network() string { return "fallback" }
func (fallbackAddr) String() string  { return "handoff-fallback" }

// takenConn adds a connection net/http let go of to the batch being
// filled. The goroutine that fills a batch sends it: a batcher goroutine of
// its own would wait behind every connection goroutine the drain woke up.
// A timer sends the last, partial batch.
func (s *Server) takenConn(c *hconn) {
	s.mu.Lock()
	s.pendingHO++
	s.batch = append(s.batch, c)
	var full []*hconn
	switch len(s.batch) {
	case handoff.MaxFDs:
		full, s.batch = s.batch, nil
	case 1:
		time.AfterFunc(batchWindow, s.flushBatch)
	}
	s.mu.Unlock()
	if full != nil {
		s.sendBatch(full) // on this goroutine, which has nothing else to do
	}
}

// batchWindow is how long a partial batch waits for more connections.
const batchWindow = 500 * time.Microsecond

func (s *Server) flushBatch() {
	s.mu.Lock()
	b := s.batch
	s.batch = nil
	s.mu.Unlock()
	if len(b) > 0 {
		s.sendBatch(b)
	}
}

func (s *Server) sendBatch(batch []*hconn) {
	out := make([]inherit.Outgoing, len(batch))
	for i, c := range batch {
		out[i] = inherit.Outgoing{Conn: c.Conn}
		if ic, ok := c.Conn.(*inherit.Conn); ok {
			out[i].Buffered = ic.Pending()
		}
	}
	err := s.opts.Handoff.Send("http", out)
	if err == nil {
		// The new worker has its own copies. Counted done before closing
		// ours: a worker about to exit need not wait for 253 closes,
		// which its exit does anyway.
		s.mu.Lock()
		s.pendingHO -= len(batch)
		s.handedOff += len(batch)
		s.mu.Unlock()
		s.signalClosed()
		for _, c := range batch {
			c.Conn.Close()
		}
		return
	}
	s.handoffOn.Store(false)
	for _, c := range batch {
		c.reset()
		// Registered before it leaves our hands: the fallback's Serve loop
		// runs on past the drain, so the drain cannot wait for it.
		s.track(c, http.StateNew)
		select {
		case s.fallback.ch <- c:
		case <-s.fallback.done:
			c.Conn.Close() // past the deadline
		}
	}
	s.mu.Lock()
	s.pendingHO -= len(batch)
	s.mu.Unlock()
	s.signalClosed()
}

// Handoff is h.Handoff(conn, kind, state, buffered): connections of an
// application's own protocol need nothing of the HTTP drain.
//
// Deprecated: use (*inherit.Handoffs).Handoff.
func Handoff(h *inherit.Handoffs, conn net.Conn, kind string, state, buffered []byte) error {
	return h.Handoff(conn, kind, state, buffered)
}
