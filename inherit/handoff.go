package inherit

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/handoff"
	"github.com/seed6cb0314a/upgrader/internal/workerenv"
)

// KindHTTP is the handoff kind of idle HTTP/1.x keep-alive connections
// between two requests, the kind net/http servers take through drain
// (docs/reference/handoff.md). Other kinds are the applications' own.
const KindHTTP = "http"

// Handoffs is the worker's end of upgrader's live-connection handoff
// channel (UPGRADER_HANDOFF_FD; the protocol is in docs/reference/handoff.md). A new
// worker receives connections from a draining one through it; a draining
// worker sends its connections through it.
//
// A nil *Handoffs, what Set.Handoffs returns when there is no channel, is
// ready to use: Listener returns nil, Send returns ErrNoHandoff and Close
// does nothing.
type Handoffs struct {
	sock  *handoff.Socket
	kinds map[string]*Listener // fixed at creation: read without a lock
	log   *slog.Logger

	mu        sync.Mutex
	nextID    uint64
	waiting   map[uint64]answer // Sends waiting for their answer, by batch id
	closed    bool
	toConvert chan received // closed by read when it ends
	converted chan struct{} // closed by convert when it ends
	park      *parker       // idle HTTP connections, until readable
	// unparked is how many more idle HTTP connections are converted at
	// once and watched (watch) instead of parked: eagerConns at first.
	unparked atomic.Int32
	knobs    knobs

	// recheck: read found a message queued (or a hang-up) when a Send's
	// answer was overdue, and looks again once it has read it;
	// queueBlind: the look (poll) failed, said once (read's only).
	recheck, queueBlind bool

	watchMu   sync.Mutex
	watched   map[net.Conn]*Listener // converted, waiting to be readable
	watching  sync.WaitGroup
	closeOnce sync.Once
	done      chan struct{} // closed once everything is released

	fdMu     sync.Mutex
	fdTable  int  // fd table size reserved so far (under fdMu)
	fdGrowth bool // a reserveFDs goroutine runs (under fdMu)
	growing  sync.WaitGroup

	// out, in embedded mode once the process has upgraded, is the channel
	// to the new process: Send goes there.
	out atomic.Pointer[Handoffs]
}

// minFDTable is the fd table reserved when a channel opens: room for a
// handoff of 10,000 connections with no growth on its way. A growth begun
// at half the table is over only after an RCU grace period, milliseconds,
// while batches of 253 fds come in under a millisecond apart: from 1,024
// slots the receiver used them up and waited for the growth in a
// 10,000-connection handoff (traced: 2.8 and 18.7 ms; docs/benchmarks.md).
// Past it, each growth has half of a larger table to cover for it. A
// worker started from upgrader's spare shim has it already (the spare
// grew it before the exec), and its reservation costs no grace period.
const minFDTable = workerenv.HandoffFDTable

// eagerConns is how many idle HTTP connections a channel converts to
// net.Conns at once, each watched by a goroutine of its own in Go's
// netpoller, before it parks the rest as bare fds until readable. A
// watched connection's next request wakes its goroutine directly, which
// hands it to its listener's Accept: it does not pay for the parker's
// thread waking nor for the conversion (docs/benchmarks.md). It is still
// delivered only once readable, as a parked one: net/http starts a new
// connection's ReadHeaderTimeout at Accept, so a connection delivered
// idle would be closed after it, which a served one never is. A few dozen
// cost as many goroutines and conversions; ten thousand would cost ten
// thousand, hence the parker past them.
const eagerConns = 64

// lateHandoff bounds how long a HANDOFF may have waited in this worker's
// socket (the kernel's arrival stamp, SO_TIMESTAMPNS) for it to be taken;
// one read later is refused. Its sender takes back what has no answer
// within SendTimeout (5 s) and serves it on: an ACK for a batch read late
// by a worker stalled on its channel would reach the sender after that,
// and two processes would own one connection. 1 s leaves the rest of the
// 5 s to the way there (milliseconds; 2 s at most for a batch upgrader
// parks until a replacement worker is ready, more only if that one's
// socket is then full too) and to the ACK's way back. A wall-clock step of
// more than 1 s forward in between refuses a batch in time: the sender
// keeps it, which loses nothing. What came before the channel's
// StampArrivals (newHandoffs, before ACCEPT) looks fresh.
const lateHandoff = time.Second

// ErrNoHandoff is returned by Send when the process has no handoff channel,
// or no longer has one (Close, or upgrader closed it), before anything was
// sent: the connections are still the caller's. A Send racing the
// channel's end may fail with its sendmsg's own error instead, nothing
// sent either.
var ErrNoHandoff = errors.New("no handoff channel (not run by upgrader, --no-handoff, or closed)")

// ErrUnanswered is returned by Send when the channel ended (upgrader went
// away, or Close) after the HANDOFF was sent and before its answer came.
// upgrader may have forwarded it, and its taker may own the connections
// already, so the caller must close its copies and not serve them: a copy
// closed while the taker holds the socket leaves the connection to the
// taker, and one that nobody else holds ends between two requests, which
// its client retries; served on, one connection could be read by two
// processes.
var ErrUnanswered = errors.New("handoff: the channel ended before the answer; the taker may own the connections")

// errChannelEnded is what shut tells the Sends still waiting; each turns
// it into ErrUnanswered, since only a Send whose sendmsg returned waits.
var errChannelEnded = errors.New("handoff channel ended")

// Handoffs opens the handoff channel New took from UPGRADER_HANDOFF_FD and
// tells upgrader, with the ACCEPT message of docs/reference/handoff.md, which kinds of
// connection this worker takes (KindHTTP for net/http servers; any name of
// 1-32 [a-z0-9._-] for the application's own). Connections arrive on
// Listener(kind) until Close.
//
// When the process has no channel (not run by upgrader, or run with
// --no-handoff) it returns nil and no error: a nil *Handoffs neither
// receives nor sends, and drain treats it as "no handoff". ACCEPT is sent
// once, so a later call returns the same *Handoffs when its kinds are among
// the first call's, and an error naming both lists otherwise. The error
// names UPGRADER_HANDOFF_FD when it does not name an AF_UNIX SOCK_SEQPACKET
// socket (unix(7)), and the kind when one is not valid.
func (s *Set) Handoffs(kinds ...string) (*Handoffs, error) {
	for _, k := range kinds {
		if !handoff.ValidKind(k) {
			return nil, fmt.Errorf("handoff kind %q: want 1-32 of [a-z0-9._-]", k)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if h := s.handoffs; h != nil {
		for _, k := range kinds {
			if h.kinds[k] == nil {
				return nil, fmt.Errorf("handoff kinds %q: the channel already takes %q, and ACCEPT is sent once (docs/reference/handoff.md)", kinds, h.kindList())
			}
		}
		return h, nil
	}
	if s.handoffErr != nil {
		return nil, s.handoffErr
	}
	if s.handoffFD < 0 && s.emb != nil {
		fd, err := s.emb.handoffChannel()
		if err != nil {
			return nil, err
		}
		s.handoffFD = fd
	}
	if s.handoffFD < 0 {
		return nil, nil
	}
	// The fd passes to the socket, which closes it once it has its own
	// copy: the Set must never use that number again.
	fd := s.handoffFD
	s.handoffFD = -1
	sock, err := handoff.NewSocket(os.NewFile(uintptr(fd), "handoff"))
	if err != nil {
		// Already "handoff fd N: cause" (a dup that failed, out of fds):
		// wrapping it in the variable's name too would say it twice.
		s.handoffErr = err
		return nil, err
	}
	h, err := newHandoffs(sock, kinds, s.log)
	if err != nil {
		s.handoffErr = fmt.Errorf("%s=%d: %w", HandoffEnv, fd, err)
		return nil, s.handoffErr
	}
	if s.emb != nil && s.emb.out != nil {
		h.out.Store(s.emb.out)
	}
	s.handoffs = h
	return h, nil
}

// answer is where a Send waits for its batch's answer, and until when.
type answer struct {
	ch       chan error
	deadline time.Time
}

// knobs are a channel's bounds: lateHandoff and SendTimeout, or a test's,
// with a test's hooks run before each read of the channel and before each
// ACK.
type knobs struct {
	late, sendTimeout time.Duration
	beforeRecv        func()
	beforeAck         func() // receive's, once it has taken a batch
}

// newHandoffs takes over sock, sends ACCEPT and starts serving it; on an
// error sock is closed.
func newHandoffs(sock *handoff.Socket, kinds []string, log *slog.Logger) (*Handoffs, error) {
	return startHandoffs(sock, kinds, log, knobs{late: lateHandoff, sendTimeout: SendTimeout})
}

// startHandoffs is newHandoffs with k.
func startHandoffs(sock *handoff.Socket, kinds []string, log *slog.Logger, k knobs) (*Handoffs, error) {
	var err error
	h := &Handoffs{sock: sock, kinds: map[string]*Listener{}, log: log, waiting: map[uint64]answer{},
		toConvert: make(chan received, 4*handoff.MaxFDs), converted: make(chan struct{}), done: make(chan struct{}),
		watched: map[net.Conn]*Listener{}, knobs: k}
	h.unparked.Store(eagerConns)
	if err := sock.StampArrivals(); err != nil {
		// Without stamps every HANDOFF counts as on time, as before.
		log.Warn("handoff: cannot tell how long a batch waited; a late one is taken all the same", "error", err)
	}
	if h.park, err = newParker(log); err != nil {
		sock.Close()
		return nil, err
	}
	for _, k := range kinds {
		h.kinds[k] = newListener(k, h)
	}
	if err := sock.Send(handoff.Message{Type: handoff.TypeAccept, Kinds: kinds}, nil); err != nil {
		sock.Close()
		h.park.close()
		return nil, err
	}
	h.reserveFDs(0)
	go h.read()
	go h.convert()
	return h, nil
}

// reserveFDs keeps the fd table ahead of the fds received (top, the
// highest so far): once half of it is used, a goroutine grows it to four
// times its size (handoff.Socket.ReserveFDs says why), while the rest
// takes the next batches.
func (h *Handoffs) reserveFDs(top int) {
	h.fdMu.Lock()
	defer h.fdMu.Unlock()
	if h.fdGrowth || top < h.fdTable/2 {
		return
	}
	n := max(minFDTable, 4*h.fdTable)
	for n <= 2*top {
		n *= 2
	}
	h.fdGrowth = true
	h.growing.Add(1)
	go func() {
		defer h.growing.Done()
		if err := h.sock.ReserveFDs(n); err != nil {
			h.log.Debug("handoff: could not reserve fds ahead", "fds", n, "error", err)
		}
		h.fdMu.Lock()
		h.fdTable, h.fdGrowth = n, false
		h.fdMu.Unlock()
	}()
}

func (h *Handoffs) kindList() []string {
	ks := make([]string, 0, len(h.kinds))
	for k := range h.kinds {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// Close ends the channel: upgrader routes no more connections here, a Send
// waiting for its answer returns ErrUnanswered (its message has gone, so
// its connections may be the taker's), and every Listener is closed.
// Connections already taken (acknowledged), parked idle ones included, are
// still returned by their Listener's Accept: dropping them would lose
// their clients; a batch taken but not yet acknowledged is closed (upgrader
// refuses it to its sender). When Close returns, the channel's goroutines
// have ended and its fds (the socket, the epoll instance) are closed. It
// is safe to call more than once, and on a nil *Handoffs; it always
// returns nil.
//
// A channel that upgrader ends instead (in embedded mode, when the old
// process exits) only ends its Listeners: they take no more, but keep
// their idle connections parked or watched until each client speaks, or
// until the Listener is closed (shut says why).
func (h *Handoffs) Close() error {
	if h == nil {
		return nil
	}
	h.closeOnce.Do(func() { h.sock.Close() }) // read's Recv returns, and read releases the rest
	for _, l := range h.kinds {
		l.Close()
	}
	<-h.done
	if out := h.out.Load(); out != nil {
		out.Close()
	}
	return nil
}

// Listener returns the listener on which connections of kind arrive, as if
// accepted, each a *Conn; nil for a kind not passed to Handoffs, and on a
// nil *Handoffs.
func (h *Handoffs) Listener(kind string) *Listener {
	if h == nil {
		return nil
	}
	return h.kinds[kind]
}

// read serves the channel until it ends (Close, or upgrader closed it),
// then releases everything.
func (h *Handoffs) read() {
	defer h.shut()
	for {
		if h.recheck {
			h.expire()
		}
		if h.knobs.beforeRecv != nil {
			h.knobs.beforeRecv()
		}
		m, fds, err := h.sock.Recv()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			h.expire() // a Send's answer is due
			continue
		}
		if err != nil && !errors.Is(err, handoff.ErrMalformed) {
			if !errors.Is(err, handoff.ErrClosed) && !errors.Is(err, net.ErrClosed) {
				h.log.Warn("handoff channel failed; taking and sending no more connections", "error", err)
			}
			return
		}
		if err != nil {
			handoff.CloseFDs(fds)
			h.log.Warn("handoff: dropped a malformed message from upgrader", "error", err)
			continue
		}
		switch m.Type {
		case handoff.TypeHandoff:
			h.receive(m, fds)
		case handoff.TypeAck, handoff.TypeNak:
			// However late this is read, it came in time if its Send
			// still waits: expire lets none go while one is queued.
			h.mu.Lock()
			a, ok := h.waiting[m.ID]
			delete(h.waiting, m.ID)
			h.mu.Unlock()
			if ok {
				if m.Type == handoff.TypeAck {
					a.ch <- nil
				} else {
					a.ch <- fmt.Errorf("handoff refused: %s", m.Reason)
				}
			}
		}
	}
}

// expire ends the Sends whose answer is overdue (past their deadline,
// sendTimeout after their sendmsg returned), with an error, but only once
// nothing is left to read in the socket: an answer that reached it by its
// deadline counts, however late this goroutine gets to it (a GC pause, a
// stopped process, a convert queue full), since its target owns the
// connections from the moment it answered. Timing out on a timer of the
// Send's own instead, the sender could serve on connections an ACK waiting
// in its socket had given away. A hang-up waiting there counts the same
// way (Socket.Queued reports it): read then takes it as the channel's
// end, and shut fails the Sends with ErrUnanswered, not a timeout. It
// leaves the read deadline at the next answer due, or none. read's only.
func (h *Handoffs) expire() {
	// Taken first: an answer that comes after the look at the queue came
	// after now too.
	now := time.Now()
	queued, err := h.sock.Queued()
	if err != nil && !h.queueBlind {
		h.queueBlind = true
		h.log.Warn("handoff: cannot tell whether an answer waits in the channel; a Send times out at its deadline", "error", err)
	}
	h.recheck = queued
	h.mu.Lock()
	defer h.mu.Unlock()
	if queued {
		h.sock.SetReadDeadline(time.Time{}) // read it first
		return
	}
	for id, a := range h.waiting {
		if !a.deadline.IsZero() && !now.Before(a.deadline) {
			a.ch <- fmt.Errorf("handoff: no answer from upgrader within %s", h.knobs.sendTimeout)
			delete(h.waiting, id)
		}
	}
	h.armLocked()
}

// armLocked sets the read deadline to the first answer due, so that read
// wakes to expire it; none when no Send waits.
func (h *Handoffs) armLocked() {
	var next time.Time
	for _, a := range h.waiting {
		if !a.deadline.IsZero() && (next.IsZero() || a.deadline.Before(next)) {
			next = a.deadline
		}
	}
	h.sock.SetReadDeadline(next)
}

// receive takes ownership of handed-off connections: it answers ACK as
// soon as it holds their fds (so the sender lets go at once), or NAK when
// this worker cannot take them, or when the message waited in its socket
// past h.late (the sender then keeps them). Turning the
// fds into net.Conns, the costly part, comes after the ACK, on the convert
// goroutine, so that a large handoff does not delay the next message; should
// it fail (out of fds), that connection is closed.
func (h *Handoffs) receive(m handoff.Message, fds []int) {
	nak := func(reason string) {
		handoff.CloseFDs(fds)
		h.sock.Send(handoff.Message{Type: handoff.TypeNak, ID: m.ID, Reason: reason}, nil)
	}
	var waited time.Duration
	if !m.Arrived.IsZero() {
		waited = time.Since(m.Arrived)
	}
	l := h.kinds[m.Kind]
	switch {
	case waited > h.knobs.late:
		// A worker this late on its channel is stalled; the sender logs
		// only that it was refused.
		h.log.Warn("handoff: refused a batch that waited too long in the channel", "kind", m.Kind, "connections", len(fds),
			"waited", waited, "bound", h.knobs.late)
		nak(fmt.Sprintf("it waited %s in this worker's queue, past %s: its sender may have taken it back", waited.Round(time.Millisecond), h.knobs.late))
		return
	case l == nil:
		nak("this worker does not take kind " + m.Kind)
		return
	case !l.reserve(len(fds)):
		nak("this worker is draining")
		return
	}
	if h.knobs.beforeAck != nil {
		h.knobs.beforeAck()
	}
	if err := h.sock.Send(handoff.Message{Type: handoff.TypeAck, ID: m.ID}, nil); errors.Is(err, net.ErrClosed) {
		// Our own Close ended the channel under this batch: upgrader
		// hears the end before any ACK and refuses the batch to its
		// sender, which serves it on. Kept here too, the connections
		// would have two owners. An ACK that fails because upgrader has
		// gone keeps them: the sender, told ErrUnanswered, closes its
		// copies.
		handoff.CloseFDs(fds)
		l.deliver(nil, len(fds))
		return
	}
	if len(fds) > 0 {
		h.reserveFDs(slices.Max(fds))
	}
	for i, fd := range fds {
		c := m.Conns[i]
		if m.Kind == KindHTTP && len(c.Buffered) == 0 {
			if h.unparked.Load() <= 0 {
				// HTTP clients speak first: nothing to do until they do.
				h.park.park(fd, l, c.State)
				continue
			}
			h.unparked.Add(-1) // read is the only writer, tests aside
		}
		h.toConvert <- received{fd, c, l}
	}
}

type received struct {
	fd int
	c  handoff.Conn
	l  *Listener
}

// convert turns received fds into connections in order, off the reading
// goroutine, so that a large handoff does not delay the next message.
func (h *Handoffs) convert() {
	defer close(h.converted)
	for r := range h.toConvert {
		c, err := fileConn(r.fd)
		if err != nil {
			h.log.Warn("handoff: a connection taken could not be used, closed", "kind", r.l.kind, "error", err)
			r.l.deliver(nil, 1)
			continue
		}
		// An idle HTTP one here is within eagerConns (receive parks the rest).
		if r.l.kind == KindHTTP && len(r.c.Buffered) == 0 && h.watch(c, r.l, r.c.State) {
			continue
		}
		r.l.deliver([]*Conn{{Conn: c, Kind: r.l.kind, State: r.c.State, pending: r.c.Buffered}}, 1)
	}
}

// watch delivers c, converted, to l once its client has sent something
// (or closed), on a goroutine of its own waiting in the netpoller, or at
// once if l closes (flushWatched). It returns false, and leaves c to the
// caller, for a connection with no fd to watch.
func (h *Handoffs) watch(c net.Conn, l *Listener, state []byte) bool {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	h.watchMu.Lock()
	h.watched[c] = l
	h.watchMu.Unlock()
	h.watching.Add(1)
	go func() {
		defer h.watching.Done()
		var b [1]byte
		rc.Read(func(fd uintptr) bool {
			_, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
			return !errors.Is(err, unix.EAGAIN) // bytes, EOF or an error: net/http's to see
		})
		h.watchMu.Lock()
		delete(h.watched, c)
		// flushWatched's deadline, if it came, is not net/http's (under
		// watchMu: no flush sets it again once c is out of the map).
		c.SetReadDeadline(time.Time{})
		h.watchMu.Unlock()
		l.deliver([]*Conn{{Conn: c, Kind: l.kind, State: state}}, 1)
	}()
	// A Close before the registration flushed without c: flush again.
	if l.isClosed() {
		h.flushWatched(l)
	}
	return true
}

// flushWatched delivers the watched connections of l at once (it is
// closing: they must go to its server, which hands them on when it
// drains), by a deadline in the past that ends their wait.
func (h *Handoffs) flushWatched(l *Listener) {
	h.watchMu.Lock()
	defer h.watchMu.Unlock()
	for c, wl := range h.watched {
		if wl == l {
			c.SetReadDeadline(time.Unix(1, 0))
		}
	}
}

// fileConn makes a net.Conn of fd and closes fd (the conn has its own
// copy). The descriptor is switched to blocking mode first, so that
// os.NewFile does not register it with the poller only to close it at once;
// net.FileConn makes its copy non-blocking again (the flag is shared).
func fileConn(fd int) (net.Conn, error) {
	unix.SetNonblock(fd, false)
	f := os.NewFile(uintptr(fd), "handed-off")
	c, err := net.FileConn(f)
	if err != nil {
		// The sender keeps serving it: leave the flag as it was.
		unix.SetNonblock(fd, true)
	}
	f.Close()
	return c, err
}

// shut releases the channel once read has ended: conversions finish, Sends
// waiting fail, and the listeners end. Their idle connections stay parked
// or watched until their clients speak or the listener closes: delivered
// idle, a connection would be closed by net/http's ReadHeaderTimeout,
// which starts at Accept, where a served idle one never is. Only then do
// the parker's epoll instance and goroutine go.
func (h *Handoffs) shut() {
	close(h.toConvert) // read, the only sender, has returned
	<-h.converted
	h.mu.Lock()
	h.closed = true
	for id, a := range h.waiting {
		a.ch <- errChannelEnded
		delete(h.waiting, id)
	}
	h.mu.Unlock()
	h.closeOnce.Do(func() { h.sock.Close() }) // upgrader ended it: release our end too
	for _, l := range h.kinds {
		l.end() // all of them first: each kind's Accept fails on its own
	}
	for _, l := range h.kinds {
		l.waitEmpty()
	}
	h.park.close()    // nothing left parked: each listener is empty or flushed
	h.watching.Wait() // nor watched
	h.growing.Wait()
	close(h.done)
}

// Outgoing is one connection to hand off.
type Outgoing struct {
	// Conn must expose its fd (syscall.Conn: *net.TCPConn, *net.UnixConn,
	// *Conn); TLS connections cannot be handed off.
	Conn net.Conn
	// State is application state for the receiver (at most 64 KiB).
	State []byte
	// Buffered are bytes already read from Conn but not consumed (at most
	// 64 KiB): the receiver reads them first.
	Buffered []byte
}

// SendTimeout bounds how long after it sends a batch an answer must reach
// Send's socket for Send to take it.
const SendTimeout = 5 * time.Second

// Send hands conns (at most 253, the kernel's SCM_MAX_FD) of kind to a
// ready worker of the newest generation, through upgrader: one HANDOFF
// message of docs/reference/handoff.md with their fds as SCM_RIGHTS (unix(7)). It
// waits for the answer, ACK or NAK: one that reached the channel's socket
// within SendTimeout of the message's sendmsg(2) returning counts,
// however late the channel's reader gets to it; with none, Send times out
// once the reader has found the socket empty past SendTimeout
// (milliseconds after it, unless the process is stalled). On nil the
// receiver owns them and the caller must close its copies. On
// ErrUnanswered (the channel ended once the message had gone) the
// receiver may own them: the caller must close its copies and not serve
// them. On any other error (refused: no ready worker takes kind, the
// target failed; timeout; ErrNoHandoff, nothing sent) the connections are
// untouched and still the caller's to serve or close.
//
// The conns' own fds are sent, not duplicates: SCM_RIGHTS gives the
// receiver its own reference to each socket when sendmsg(2) runs, so a dup
// (and its close) per connection would buy nothing. Each conn's fd is held
// through its syscall.RawConn.Control for the length of the sendmsg, so
// that a Close from elsewhere in the meantime waits instead of freeing the
// fd number for reuse; a conn already closed fails Send, with nothing sent.
func (h *Handoffs) Send(kind string, conns []Outgoing) error {
	if h == nil {
		return ErrNoHandoff
	}
	if out := h.out.Load(); out != nil {
		return out.Send(kind, conns)
	}
	m := handoff.Message{Type: handoff.TypeHandoff, Kind: kind, Conns: make([]handoff.Conn, len(conns))}
	rcs := make([]syscall.RawConn, len(conns))
	for i, o := range conns {
		sc, ok := o.Conn.(syscall.Conn)
		if !ok {
			return fmt.Errorf("handoff: %T has no fd to pass", o.Conn)
		}
		rc, err := sc.SyscallConn()
		if err != nil {
			return fmt.Errorf("handoff: %w", err)
		}
		rcs[i] = rc
		m.Conns[i] = handoff.Conn{State: o.State, Buffered: o.Buffered}
	}
	ch := make(chan error, 1)
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return ErrNoHandoff
	}
	h.nextID++
	m.ID = h.nextID
	h.waiting[m.ID] = answer{ch: ch} // no deadline until sent
	h.mu.Unlock()
	err := withFDs(rcs, make([]int, 0, len(rcs)), func(fds []int) error { return h.sock.Send(m, fds) })
	if err != nil {
		h.forget(m.ID)
		return err
	}
	h.mu.Lock()
	if a, ok := h.waiting[m.ID]; ok {
		a.deadline = time.Now().Add(h.knobs.sendTimeout)
		h.waiting[m.ID] = a
		h.armLocked()
	}
	h.mu.Unlock()
	// The channel's reader answers, or times the batch out (expire), or
	// the channel ends (shut) with the batch on its way.
	if err := <-ch; err != errChannelEnded {
		return err
	}
	return ErrUnanswered
}

// withFDs calls f with the fds of rcs, each held open (RawConn.Control)
// until f returns: one Control inside the next, so at most 253 deep.
func withFDs(rcs []syscall.RawConn, fds []int, f func([]int) error) error {
	if len(rcs) == 0 {
		return f(fds)
	}
	var ferr error
	if err := rcs[0].Control(func(fd uintptr) {
		ferr = withFDs(rcs[1:], append(fds, int(fd)), f)
	}); err != nil {
		return fmt.Errorf("handoff: %w", err)
	}
	return ferr
}

func (h *Handoffs) forget(id uint64) {
	h.mu.Lock()
	delete(h.waiting, id)
	h.mu.Unlock()
}

// Conn is a handed-off connection as the receiver sees it.
type Conn struct {
	net.Conn
	// Kind and State are what the sender gave.
	Kind  string
	State []byte

	mu      sync.Mutex
	pending []byte // the sender's buffered bytes, read first
}

// Read returns the sender's buffered bytes first, then reads the socket.
func (c *Conn) Read(p []byte) (int, error) {
	c.mu.Lock()
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		c.pending = c.pending[n:]
		c.mu.Unlock()
		return n, nil
	}
	c.mu.Unlock()
	return c.Conn.Read(p)
}

// Pending returns the sender's buffered bytes not read yet, so that a
// connection handed off again carries them along.
func (c *Conn) Pending() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]byte(nil), c.pending...)
}

// SyscallConn exposes the socket, so the connection can be handed off again.
func (c *Conn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, fmt.Errorf("handoff: %T has no fd", c.Conn)
	}
	return sc.SyscallConn()
}

// Listener yields handed-off connections of one kind. It implements
// net.Listener, so an http.Server serves it with srv.Serve.
type Listener struct {
	kind     string
	mu       sync.Mutex
	cond     *sync.Cond
	queue    []*Conn
	reserved int  // acknowledged, still being converted or parked
	closed   bool // by Close: parked and watched ones are flushed
	ended    bool // by the channel's end: no more will come
	h        *Handoffs
}

func newListener(kind string, h *Handoffs) *Listener {
	l := &Listener{kind: kind, h: h}
	l.cond = sync.NewCond(&l.mu)
	return l
}

// reserve promises n connections, unless the listener is closed. (An
// ended one is never asked: read, its only caller, has returned.)
func (l *Listener) reserve(n int) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false
	}
	l.reserved += n
	return true
}

// deliver queues the connections promised by reserve(n).
func (l *Listener) deliver(cs []*Conn, n int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.reserved -= n
	l.queue = append(l.queue, cs...)
	l.cond.Broadcast()
}

// Pending counts connections taken (acknowledged) but not yet returned by
// Accept; 0 for a nil Listener.
func (l *Listener) Pending() int {
	if l == nil {
		return 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.reserved + len(l.queue)
}

// Accept waits for the next handed-off connection, a *Conn. Once the
// listener is closed, or its channel has ended, and every connection taken
// has been returned, it returns net.ErrClosed.
func (l *Listener) Accept() (net.Conn, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for len(l.queue) == 0 && !((l.closed || l.ended) && l.reserved == 0) {
		l.cond.Wait()
	}
	if len(l.queue) == 0 {
		return nil, net.ErrClosed
	}
	c := l.queue[0]
	l.queue = l.queue[1:]
	return c, nil
}

// Close stops the listener taking more connections (further handoffs of its
// kind are refused with NAK, and their senders keep them). Connections already acknowledged
// are still returned by Accept, which fails only once they are all out:
// dropping them would lose their requests.
func (l *Listener) Close() error {
	l.mu.Lock()
	l.closed = true
	l.cond.Broadcast()
	l.mu.Unlock()
	if l.h != nil {
		l.h.park.flush(l)
		l.h.flushWatched(l)
	}
	return nil
}

// end marks the listener's channel ended: it takes no more.
func (l *Listener) end() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.ended = true
	l.cond.Broadcast()
}

// waitEmpty returns once nothing is parked or watched for l: every
// connection taken has been delivered (its client spoke or left), or
// Close has flushed them.
func (l *Listener) waitEmpty() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for !l.closed && l.reserved > 0 {
		l.cond.Wait()
	}
}

func (l *Listener) isClosed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closed
}

// Addr is a placeholder address naming the kind.
func (l *Listener) Addr() net.Addr { return handoffAddr(l.kind) }

type handoffAddr string

func (a handoffAddr) Network() string { return "handoff" }
func (a handoffAddr) String() string  { return "handoff:" + string(a) }
