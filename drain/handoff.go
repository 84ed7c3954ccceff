package drain

import (
	"errors"
	"io"
	"net"
	"net/http"
	"os"
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
// none of the connection's bytes, and serves it as HTTP/1.x:
//
//   - the connection is idle or new (ConnState) and no byte was returned to
//     net/http since, so no next request has begun;
//   - net/http asks for a whole 4096-byte buffer, which it does only when
//     its bufio.Reader is empty (it asks for less when it holds some bytes);
//   - it has served an HTTP/1.x request, or nothing was read from it yet:
//     HTTP/2's frame reader may ask for 4096 bytes too.
//
// Otherwise the kick is undone (net/http's own deadline is restored) and
// the read goes on: the request is served here, and since net/http holds
// bytes of it (a pipelined request, or one whose first byte net/http's
// background read took while the previous handler ran), its response says
// "Connection: close". A connection is queued for handoff at most once.
//
// Most idle connections need no wake-up at all: net/http's read for the
// next request waits in hconn.Read for the socket, and that read makes
// its read(2) through the socket's RawConn with c.mu held, counting what
// it returned under the same lock. So a kick that holds c.mu and finds
// such a read waiting, with the conditions above met, knows that no byte
// was taken from the socket and none will be: it takes the connection
// where it is ("in place"), and the waiting read, should the socket wake
// it, leaves the bytes to the new owner. net/http's goroutine stays asleep
// (waking and ending it was half of the old worker's CPU in a handoff of
// 10,000 connections); it ends when our copy closes after the answer, or
// with the process. A refusal undoes the take, and the same read goes on
// serving the connection here.

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
	s    *Server
	info *connInfo

	mu           sync.Mutex
	delivered    int64 // bytes returned to net/http
	idleMark     int64 // delivered when it last turned idle
	idle         bool  // StateIdle, or StateNew: between requests
	want         bool  // a takeover is asked for
	closeWant    bool  // ... to close it, not to hand it off (closeIdle)
	kicked       bool  // our deadline is set, not net/http's
	httpDeadline time.Time
	taken        bool // Read refused net/http: Close hands off
	handing      bool // Close has queued it for handoff
	offered      bool // it was queued once: never again, even if refused
	// raw is the socket's RawConn, for reads that a take in place cannot
	// race (read); nil for a socket without one.
	raw syscall.RawConn
	// waiting is the length of net/http's read that waits in read for the
	// socket, holding nothing of it yet; 0 when none does.
	waiting int
	// inPlace: taken while that read waited (kick); the read leaves the
	// socket's bytes alone until the answer. woken: a refusal undid it,
	// and our deadline wakes the read, which then goes on as before.
	inPlace bool
	woken   bool
	// fresh: StateNew, no request served yet. Such a connection is not
	// taken in place: net/http's Shutdown waits for one younger than 5s
	// as if busy, and its goroutine would hold the drain's end.
	fresh bool
	// closed: net/http closed it (Close, not taken): a kick must not take
	// it in place after its read's wait ended on the close.
	closed bool
	// noHandoff: net/http holds bytes of a next request (a takeover failed
	// on them, or the client sent it while a response was being finished),
	// so the connection cannot be handed off: its next response says
	// Connection: close instead.
	noHandoff bool
	// released is closed once net/http has reported the StateClosed of the
	// serve loop that let go of it (track): only then may a refused
	// connection be registered again, or that late StateClosed would
	// unregister it while it is served here, and the drain could end
	// (and Shutdown close it) under a client's next request.
	released chan struct{}
}

// quiet reports whether net/http holds none of c's bytes, for a read of n
// bytes: c is between requests, no byte was returned since, and net/http
// asks for a whole buffer, which it does only when its bufio.Reader is
// empty. c.mu is held.
func (c *hconn) quiet(n int) bool {
	return c.idle && n == httpReadBuffer && c.delivered == c.idleMark
}

// http1 reports whether net/http serves c as HTTP/1.x, or has read nothing
// of it yet. HTTP/2's frame reader can ask for 4096 bytes too: a
// connection that is not provably HTTP/1.x is never taken. c.mu is held.
func (c *hconn) http1() bool {
	return !c.info.h2.Load() && (c.info.http1.Load() || c.delivered == 0)
}

// ready reports whether the takeover asked for can happen now, for a read
// of n bytes. c.mu is held.
func (c *hconn) ready(n int) bool {
	if !c.want || !c.quiet(n) || !c.http1() {
		return false
	}
	// A close must not drop bytes the kernel holds, nor those a handed-off
	// connection still carries from its sender: the client has begun its
	// next request. A handoff takes them along.
	if !c.closeWant {
		return true
	}
	if ic, ok := c.Conn.(*inherit.Conn); ok && len(ic.Pending()) > 0 {
		return false
	}
	return unread(c.Conn) == 0
}

// takeover is what the serve loop's read gets at a takeover: EOF, on
// which net/http drops the connection without a word, and calls Close,
// which hands off (taken) or closes. c.mu is held, and released.
func (c *hconn) takeover() (int, error) {
	c.taken = !c.closeWant
	c.want, c.kicked = false, false
	c.mu.Unlock()
	return 0, errTakenOver
}

func (c *hconn) Read(p []byte) (int, error) {
	for {
		c.mu.Lock()
		if c.ready(len(p)) {
			return c.takeover()
		}
		raw := c.raw != nil && c.idle && len(p) == httpReadBuffer && !c.kicked
		c.mu.Unlock()
		var n int
		var err error
		if raw {
			if n, err = c.read(p); err == errInPlace {
				return 0, errTakenOver // net/http lets go; the answer decides
			}
		} else {
			n, err = c.Conn.Read(p)
		}
		resolved := false
		c.mu.Lock()
		if !raw {
			c.delivered += int64(n) // read counts its own under c.mu
		}
		if len(p) == 1 && n == 1 && !c.idle && c.s.draining.Load() {
			// net/http's background read, while a handler runs, got the
			// first byte of a next request: net/http holds it now.
			c.noHandoff = true
		}
		if c.kicked {
			// The deadline's own error, not any timeout: errors.As
			// reflects on every read of a kicked connection, and a
			// kernel ETIMEDOUT is a Timeout() too.
			ours := n == 0 && errors.Is(err, os.ErrDeadlineExceeded)
			if ours && c.ready(len(p)) {
				return c.takeover()
			}
			// Bytes came first, or net/http holds some: serve it here.
			resolved = !c.closeWant // counted once c.mu is released
			c.kicked, c.want = false, false
			c.Conn.SetReadDeadline(c.httpDeadline)
			if ours {
				// A read for a request that found bytes held in net/http
				// (or not HTTP/1.x): this connection cannot go, so its
				// next response ends it. Not so net/http's background
				// read (1 byte, while a handler runs), which holds none,
				// nor a first read (h2c's preface check), which has none:
				// the kick comes again when the connection turns idle.
				if len(p) != 1 && c.delivered > 0 {
					c.noHandoff = true
				}
				c.mu.Unlock()
				if resolved {
					c.s.kickResolved()
				}
				continue // our own deadline, not net/http's
			}
		}
		c.mu.Unlock()
		if resolved {
			c.s.kickResolved()
		}
		return n, err
	}
}

// errInPlace is read's word that the connection was taken in place.
var errInPlace = errors.New("drain: taken in place")

// read is net/http's read for a next request, made through c.raw: each
// read(2), and the count of what it returned, under c.mu, so that kick
// sees either the bytes counted or none taken. While it waits for the
// socket, c.waiting says so. Once the connection is taken in place it
// reads nothing more, and returns errInPlace when the wait ends (our copy
// closed after the answer, or a deadline). Its errors are those of
// net.Conn's Read: io.EOF, or a *net.OpError.
func (c *hconn) read(p []byte) (int, error) {
	if ic, ok := c.Conn.(*inherit.Conn); ok && len(ic.Pending()) > 0 {
		// The sender's bytes come first, and from memory.
		n, err := c.Conn.Read(p)
		c.mu.Lock()
		c.delivered += int64(n)
		c.mu.Unlock()
		return n, err
	}
	c.mu.Lock()
	c.waiting = len(p)
	c.mu.Unlock()
	for {
		var n int
		var rerr error
		done := false
		werr := c.raw.Read(func(fd uintptr) bool {
			c.mu.Lock()
			defer c.mu.Unlock()
			if c.inPlace {
				if h := c.s.testInPlaceWoken; h != nil {
					h()
				}
				return false // the new owner's bytes
			}
			n, rerr, done = c.readLocked(fd, p)
			return done
		})
		if done {
			return n, c.readError(n, rerr)
		}
		// The wait ended: a deadline, or the socket closed.
		if oe, ok := werr.(*net.OpError); ok {
			werr = oe.Err // RawConn's own "raw-read" wrapping
		}
		c.mu.Lock()
		if c.inPlace {
			c.waiting = 0
			c.mu.Unlock()
			return 0, errInPlace
		}
		if c.woken && !c.kicked && errors.Is(werr, os.ErrDeadlineExceeded) {
			// A refusal's wake-up, or net/http's own deadline that came
			// while the connection was taken: bytes that arrived
			// meanwhile are read first (an expired deadline would fail
			// the wait before any read), then the read goes on under
			// net/http's deadline again.
			c.woken = false
			c.Conn.SetReadDeadline(c.httpDeadline)
			cerr := c.raw.Control(func(fd uintptr) { n, rerr, done = c.readLocked(fd, p) })
			c.mu.Unlock()
			if cerr == nil && done {
				return n, c.readError(n, rerr)
			}
			continue
		}
		c.woken = false
		c.waiting = 0
		c.mu.Unlock()
		return 0, c.opError(werr)
	}
}

// readLocked makes read's read(2) on fd, counting what it returned; done
// is false when the socket has nothing yet (EAGAIN). c.mu is held.
func (c *hconn) readLocked(fd uintptr, p []byte) (n int, err error, done bool) {
	for {
		n, err = syscall.Read(int(fd), p)
		if err != syscall.EINTR {
			break
		}
	}
	if err == syscall.EAGAIN {
		return 0, nil, false
	}
	n = max(n, 0)
	c.delivered += int64(n)
	c.waiting = 0
	if c.woken {
		// The wake-up's deadline never came back (the bytes woke the
		// read first): net/http's own deadline rules again.
		c.woken = false
		c.Conn.SetReadDeadline(c.httpDeadline)
	}
	return n, err, true
}

// readError is what net.Conn's Read returns for a read(2) of n bytes that
// failed with err (nil: none).
func (c *hconn) readError(n int, err error) error {
	switch {
	case err != nil:
		return c.opError(os.NewSyscallError("read", err))
	case n == 0:
		return io.EOF
	}
	return nil
}

// opError wraps a read's error as net.Conn's Read does.
func (c *hconn) opError(err error) error {
	return &net.OpError{Op: "read", Net: c.LocalAddr().Network(), Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}

func (c *hconn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.httpDeadline = t
	if c.kicked || c.woken {
		return nil // restored when the kick, or the wake-up, is undone
	}
	return c.Conn.SetReadDeadline(t)
}

func (c *hconn) SetDeadline(t time.Time) error {
	if err := c.SetReadDeadline(t); err != nil {
		return err
	}
	return c.Conn.SetWriteDeadline(t)
}

// kick asks for a takeover of an idle connection: a handoff, or with
// close set, a close (closeIdle). It reports whether it asked: a
// connection that is busy, already asked, or cannot go is left alone. A
// handoff kick is resolved by takenConn (taken) or kickResolved (the
// kick undone: the connection is served here after all). inPlace reports
// a handoff taken at once, net/http's read left waiting (read): the
// caller queues it (takenInPlace).
func (c *hconn) kick(close bool) (asked, inPlace bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.idle || c.taken || c.want || c.closed || !c.http1() || (!close && (c.noHandoff || c.offered)) {
		return false, false // an offered one was refused once: never again
	}
	if !close && !c.fresh && c.waiting == httpReadBuffer && c.quiet(httpReadBuffer) {
		c.taken, c.inPlace, c.handing, c.offered = true, true, true, true
		c.released = make(chan struct{})
		return true, true
	}
	c.want, c.kicked, c.closeWant = true, true, close
	c.Conn.SetReadDeadline(aLongTimeAgo)
	return true, false
}

// handable reports whether c's next response may leave it open for a
// handoff.
func (c *hconn) handable() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.noHandoff
}

func (c *hconn) setIdle(idle, fresh bool) {
	c.mu.Lock()
	c.idle, c.fresh = idle, fresh
	if idle {
		c.idleMark = c.delivered
	}
	c.mu.Unlock()
}

// Close hands the connection off when Read refused it to net/http. Only
// the first Close does: net/http may call it again (srv.Close at the drain
// deadline) while the connection is queued or in flight, and then its
// batch's answer decides who closes it.
func (c *hconn) Close() error {
	c.mu.Lock()
	taken, first := c.taken, !c.handing && !c.offered
	if taken && first {
		c.handing, c.offered = true, true
		c.released = make(chan struct{})
	}
	c.closed = c.closed || !taken
	c.mu.Unlock()
	if taken {
		if first {
			c.s.takenConn(c)
		}
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
	c.taken, c.handing, c.want, c.kicked, c.idle = false, false, false, false, false
	c.closeWant, c.inPlace, c.woken = false, false, false
	c.released = nil
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
	hc := &hconn{Conn: c, s: l.s, info: new(connInfo)}
	if l.s.opts.Handoff != nil {
		hc.raw = socketRawConn(c) // only a handoff takes in place
	}
	return hc, nil
}

// socketRawConn returns the RawConn of c's socket, beneath a handed-off
// connection's wrapper: only a net package socket's, whose Read is the
// read(2) that hconn.read makes in its place.
func socketRawConn(c net.Conn) syscall.RawConn {
	if ic, ok := c.(*inherit.Conn); ok {
		c = ic.Conn
	}
	var sc syscall.Conn
	switch c := c.(type) {
	case *net.TCPConn:
		sc = c
	case *net.UnixConn:
		sc = c
	default:
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
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

// Taken connections go out in batches of up to handoff.MaxFDs, at most
// maxInFlight of them awaiting an answer at once; the others wait in
// s.queue, holding nothing but memory (Send passes the connections' own
// fds, and a batch's fds are referenced by the kernel only while it is in
// the channel). A batch goes out when it is full; a partial one at once
// when no batch is in flight, what is taken while it is on its way
// making up the next (as TCP's autocorking does), or else batchWindow
// after its first connection was taken, or, once that window has
// passed, as soon as a slot is free. A connection in transit cannot be
// answered, and its client may be sending a request: no connection waits
// out a window while the channel is idle. The goroutine that frees a slot
// or fills a batch sends: a batcher goroutine of its own would wait behind
// every connection goroutine the drain woke up.
//
// Every taken connection is counted in s.pendingHO from takenConn until
// its batch is answered: the drain cannot end with one queued, in flight,
// or on its way back to net/http.
const maxInFlight = 4

// batchWindow is how long a partial batch waits for more connections
// while another batch is in flight.
const batchWindow = 500 * time.Microsecond

// Kicks are paced: at most kickAhead connections are between their kick
// and their batch's answer (s.kicked + s.pendingHO), the rest of the idle
// ones wait in s.toKick. Kicking all of them at once would make every
// one's net/http goroutine runnable together, and while any is, the Go
// scheduler does not poll the network: the answers to the batches already
// sent would wait behind all of them, and so would upgrader and the new
// worker, with nothing to relay. Paced, the old worker takes the next
// connections while upgrader and the new worker handle the batches before
// them.
const kickAhead = (maxInFlight + 1) * handoff.MaxFDs

// kickIdle asks for the takeover of every idle connection, kickAhead at a
// time.
func (s *Server) kickIdle() {
	if !s.handoffOn.Load() {
		return
	}
	s.mu.Lock()
	for c, info := range s.conns {
		if hc, ok := c.(*hconn); ok && (info.state == http.StateIdle || info.state == http.StateNew) {
			s.toKick = append(s.toKick, hc)
		}
	}
	s.mu.Unlock()
	s.kickMore()
}

// kickOne queues c, which turned idle during the drain, for a kick, as
// kickIdle does the others: until kicked it is served here as before.
func (s *Server) kickOne(c *hconn) {
	s.mu.Lock()
	s.toKick = append(s.toKick, c)
	s.mu.Unlock()
	s.kickMore()
}

// kickResolved counts a handoff kick that ended without a takeover, and
// kicks more.
func (s *Server) kickResolved() {
	s.mu.Lock()
	s.kicked--
	s.mu.Unlock()
	s.kickMore()
}

// kickMore kicks the next idle connections of s.toKick, a batch at least
// at a time, while fewer than kickAhead are under way. Once the handoff is
// refused, those left are closed once idle for the grace, as every idle
// connection that cannot go is.
func (s *Server) kickMore() {
	// Kicks that missed, or a refusal, may have ended the handoff.
	defer s.closeCopies(nil)
	for {
		s.mu.Lock()
		if len(s.toKick) == 0 {
			s.mu.Unlock()
			return
		}
		if !s.handoffOn.Load() {
			var plan []idleCheck
			for _, c := range s.toKick {
				if info, ok := s.conns[c]; ok && s.idleCloseLocked(c, info) {
					plan = append(plan, idleCheck{c: c, info: info, seq: info.seq})
				}
			}
			s.toKick = nil
			s.mu.Unlock()
			s.planIdleClose(plan, s.opts.IdleGrace)
			return
		}
		room := kickAhead - s.kicked - s.pendingHO
		if room < min(handoff.MaxFDs, len(s.toKick)) {
			s.mu.Unlock()
			return
		}
		next := s.toKick[:min(room, len(s.toKick))]
		s.toKick = s.toKick[len(next):]
		if len(s.toKick) == 0 {
			s.toKick = nil
		}
		s.kicked += len(next)
		s.mu.Unlock()
		missed := 0
		var inPlace []*hconn
		for _, c := range next {
			switch asked, taken := c.kick(false); {
			case !asked:
				missed++ // busy or gone meanwhile
			case taken:
				inPlace = append(inPlace, c)
			}
		}
		if len(inPlace) > 0 {
			s.takenInPlace(inPlace)
		}
		if missed == 0 {
			return
		}
		s.mu.Lock()
		s.kicked -= missed
		s.mu.Unlock()
	}
}

// takenInPlace queues connections kick took where their read waits, as
// takenConn does one net/http let go of, and sends the batches that are
// ready, each on a goroutine of its own: the caller kicks on.
func (s *Server) takenInPlace(cs []*hconn) {
	s.mu.Lock()
	s.kicked -= len(cs)
	s.pendingHO += len(cs)
	if !s.handoffOn.Load() {
		s.mu.Unlock()
		s.refuse(cs)
		return
	}
	s.queue = append(s.queue, cs...)
	if !s.windowArmed && !s.windowDue {
		s.windowArmed = true
		time.AfterFunc(batchWindow, s.windowEnd)
	}
	var bs [][]*hconn
	for b := s.nextBatchLocked(); b != nil; b = s.nextBatchLocked() {
		bs = append(bs, b)
	}
	s.mu.Unlock()
	for _, b := range bs {
		go s.sendBatches(b)
	}
}

// takenConn queues a connection net/http let go of for the next batch.
func (s *Server) takenConn(c *hconn) {
	s.mu.Lock()
	s.kicked--
	s.pendingHO++
	if !s.handoffOn.Load() {
		// A batch was refused since this one was kicked: serve it here.
		s.mu.Unlock()
		s.refuse([]*hconn{c})
		return
	}
	s.queue = append(s.queue, c)
	if !s.windowArmed && !s.windowDue {
		s.windowArmed = true
		time.AfterFunc(batchWindow, s.windowEnd)
	}
	b := s.nextBatchLocked()
	s.mu.Unlock()
	s.sendBatches(b) // on this goroutine, which has nothing else to do
}

// windowEnd makes the partial batch due, and sends it if a slot is free.
func (s *Server) windowEnd() {
	s.mu.Lock()
	s.windowArmed = false
	s.windowDue = len(s.queue) > 0
	b := s.nextBatchLocked()
	s.mu.Unlock()
	s.sendBatches(b)
}

// nextBatchLocked takes the next batch off the queue when one is ready and
// a slot is free, and counts it in flight; nil otherwise. s.mu is held.
func (s *Server) nextBatchLocked() []*hconn {
	if s.inFlight >= maxInFlight || len(s.queue) == 0 {
		return nil
	}
	n := len(s.queue)
	switch {
	case n >= handoff.MaxFDs:
		n = handoff.MaxFDs
	case s.inFlight == 0:
		// Nothing in flight: a partial batch goes at once, and what is
		// taken while it is on its way makes up the next one.
	case !s.windowDue:
		return nil // the window is still open
	}
	// The batch is the queue's head, and the queue what follows: a copy
	// of the rest for every batch would be quadratic in a drain of
	// 100,000 connections. takenConn's appends reallocate the queue once
	// its array is used up.
	b := s.queue[:n:n]
	s.queue = s.queue[n:]
	if len(s.queue) == 0 {
		s.queue = nil
		s.windowDue = false
	} else if !s.windowArmed && !s.windowDue {
		s.windowArmed = true
		time.AfterFunc(batchWindow, s.windowEnd)
	}
	s.inFlight++
	return b
}

// sendBatches sends b, then whatever batch is ready when its slot frees.
func (s *Server) sendBatches(b []*hconn) {
	for b != nil {
		s.sendBatch(b)
		s.mu.Lock()
		s.inFlight--
		b = s.nextBatchLocked()
		s.mu.Unlock()
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
	// Send uses the connections' own fds. None can be closed meanwhile:
	// net/http has let go of each (hconn.Close), a second Close from
	// net/http (srv.Close at the deadline) does nothing to a taken
	// connection, and only this batch's answer decides who closes it.
	err := s.opts.Handoff.Send("http", out)
	unanswered := errors.Is(err, inherit.ErrUnanswered)
	if err == nil || unanswered {
		// The new worker has its own references (ACK), or may have them
		// (the channel ended with the batch on its way: upgrader gone);
		// either way our copies close and are never served, lest two
		// processes read one connection. One the new worker never got
		// ends between two requests, which its client retries. Counted
		// done first: the drain need not wait for our copies to close.
		s.mu.Lock()
		s.pendingHO -= len(batch)
		if !unanswered {
			s.handedOff += len(batch)
		}
		for _, c := range batch {
			// One taken in place is still net/http's until our copy
			// closes: the drain need not wait for that.
			delete(s.conns, c)
		}
		s.mu.Unlock()
		s.signalClosed()
		s.closeCopies(batch)
		if !unanswered {
			s.kickMore()
			return
		}
	}
	if first := s.handoffOn.Swap(false); s.opts.Logger != nil && unanswered {
		// Each such batch: connections closed rather than served.
		s.opts.Logger.Warn("drain: the handoff channel ended with a batch on its way; its connections are closed here (the new worker may have them), the rest drain here", "connections", len(batch), "error", err)
	} else if first && s.opts.Logger != nil {
		s.opts.Logger.Info("drain: handoff refused; the remaining connections drain here", "connections", len(batch), "error", err)
	}
	// Nothing more goes out: what is queued is served here too.
	s.mu.Lock()
	queued := s.queue
	s.queue, s.windowDue = nil, false
	s.mu.Unlock()
	if !unanswered {
		s.refuse(batch)
	}
	s.refuse(queued)
	s.kickMore()
}

// refuse gives taken connections back to this worker's http.Server, each
// once net/http has let go of it for good (hconn.released). It may be
// called from net/http's own Close, so it waits on a goroutine of its own;
// the connections stay counted in s.pendingHO until they are back.
func (s *Server) refuse(cs []*hconn) {
	go s.giveBack(cs)
}

func (s *Server) giveBack(cs []*hconn) {
	for _, c := range cs {
		c.mu.Lock()
		if c.inPlace && c.waiting > 0 {
			// Taken where its read waits, which has not ended: that read
			// serves it here again, woken in case the socket's wake-up
			// came while it was taken (edge-triggered, it comes once).
			c.taken, c.handing, c.inPlace, c.released = false, false, false, nil
			c.woken = true
			c.Conn.SetReadDeadline(aLongTimeAgo)
			c.mu.Unlock()
			select {
			case <-s.fallback.done:
				c.Conn.Close() // past the deadline
			default:
				// Idle, and it cannot go now: it closes after the
				// grace, as one given back does (track, StateNew).
				var plan []idleCheck
				s.mu.Lock()
				if info, ok := s.conns[c]; ok {
					info.seq++
					if s.idleCloseLocked(c, info) {
						plan = []idleCheck{{c: c, info: info, seq: info.seq}}
					}
				}
				s.mu.Unlock()
				s.planIdleClose(plan, s.opts.IdleGrace)
			}
			continue
		}
		released := c.released
		c.mu.Unlock()
		if released != nil {
			<-released
		}
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
	s.pendingHO -= len(cs)
	s.mu.Unlock()
	s.signalClosed()
	s.closeCopies(nil)
}

// closeCopies closes our copies of handed-off connections on a goroutine
// of its own, once no handoff is under way: each close costs an
// epoll_ctl and a close(2), as much as taking the connection did, and
// made in the middle of a large handoff they would take that CPU from the
// batches still to send. It is prompt all the same (the client sees the
// new worker's close only once ours is gone too): a handoff of 10,000
// connections is over within a tenth of a second, and when it ends the
// drain, the process's exit closes them at less cost. s.closing lets a
// test wait for it. A nil cs starts the closing of what is kept, once the
// handoff is over or the drain has returned.
func (s *Server) closeCopies(cs []*hconn) {
	// Appended first, then checked: whoever ends the handoff, or appends
	// after its end, finds what is kept and starts the closer if none runs.
	if len(cs) > 0 {
		s.closeMu.Lock()
		s.toClose = append(s.toClose, cs...)
		s.closeMu.Unlock()
	}
	s.mu.Lock()
	over := s.drained.Load() || s.kicked == 0 && len(s.toKick) == 0 && s.pendingHO == 0
	s.mu.Unlock()
	if !over {
		return
	}
	s.closeMu.Lock()
	start := !s.closerOn && len(s.toClose) > 0
	if start {
		s.closerOn = true
		s.closing.Add(1)
	}
	s.closeMu.Unlock()
	if !start {
		return
	}
	go func() {
		defer s.closing.Done()
		for {
			s.closeMu.Lock()
			cs := s.toClose
			s.toClose = nil
			if len(cs) == 0 {
				s.closerOn = false
				s.closeMu.Unlock()
				return
			}
			s.closeMu.Unlock()
			for _, c := range cs {
				c.Conn.Close()
			}
		}
	}()
}

// Handoff is h.Handoff(conn, kind, state, buffered): connections of an
// application's own protocol need nothing of the HTTP drain.
//
// Deprecated: use (*inherit.Handoffs).Handoff.
func Handoff(h *inherit.Handoffs, conn net.Conn, kind string, state, buffered []byte) error {
	return h.Handoff(conn, kind, state, buffered)
}
