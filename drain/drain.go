// Package drain is the worker side of close-then-exit for net/http servers:
// on the drain signal it stops accepting, answers the next request on every
// keep-alive connection with "Connection: close", lets in-flight requests
// finish, and returns once every connection is closed or the deadline hits.
//
// The order matters. http.Server.Shutdown (and SetKeepAlivesEnabled(false))
// close idle keep-alive connections at once, racing a client that is just
// sending its next request; and once shutting down, net/http drops requests
// it has already read. So Serve never calls either until no connection is
// left.
//
// With Options.Handoff (inherit.Set.Handoffs), idle keep-alive HTTP/1.1
// connections are not even closed: they go to the newest generation over
// upgrader's handoff channel (docs/reference/handoff.md), and a connection of another
// protocol can go with its state (Handoff). The same code runs three ways,
// as the examples show: under upgrader, under systemd socket activation
// (sd_listen_fds(3); no handoff there), and standalone.
//
// Each kind of connection leaves its own way (docs/draining.md has the
// table and the reasons): idle HTTP/1.1 is handed off, or closed after
// Options.IdleGrace when it cannot be (TLS, no channel); HTTP/1.1 with
// bytes of a next request already read gets "Connection: close"; HTTP/2
// (TLS, or net/http's own h2c) gets GOAWAY when the drain begins;
// hijacked connections are the application's, which learns of the drain
// from Started and is waited for. A second drain signal closes what is
// idle at once. golang.org/x/net/http2/h2c's handler is refused: its
// streams bypass the drain.
package drain

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/seed6cb0314a/upgrader/inherit"
)

// connKey carries the request's connection in its context.
type connKey struct{}

// Options tune Serve. The zero value is usable.
//
// What Serve takes over, and how to keep each:
//   - signals: Signals (default SIGTERM and SIGINT) start the drain, and are
//     not delivered to the process's default handling while Serve runs
//     (signal.Notify); cancel Serve's ctx to drain on your own terms
//     instead.
//   - readiness: READY=1 on $NOTIFY_SOCKET once serving, STOPPING=1 when
//     the drain begins (sd_notify(3)); NoReady skips READY=1 for a process
//     that reports readiness itself. Both go through inherit.Ready and
//     inherit.Notify, so in embedded mode (inherit.WithUpgrades) readiness
//     is tableflip's Ready, and the drain also begins when the process has
//     upgraded (inherit.Upgraded, tableflip's Exit).
//   - srv.ConnState and srv.ConnContext: New installs its own, which call
//     the ones already set first (ConnContext) or last (ConnState); set
//     them before New, never after.
//   - srv.Handler: wrapped for the Connection: close marking and, unless
//     NoRecover, with Recover, which turns a handler panic into a 500 and a
//     drain of the whole worker.
type Options struct {
	// Timeout is how long a drain may take before the remaining connections
	// are closed (default 25s: under upgrader's default --drain-timeout of 30s).
	Timeout time.Duration
	// Signals start the drain (default SIGTERM and SIGINT).
	Signals []os.Signal
	// NoReady stops Serve from sending READY=1 once it serves.
	NoReady bool
	// OnDrain, if set, is called when the drain begins.
	OnDrain func()
	// NoRecover leaves handler panics to net/http, which logs them to
	// srv.ErrorLog and closes that connection only, instead of Recover's
	// 500 and drain of the worker (Fail). Go's panics still call Fail.
	NoRecover bool
	// Logger receives the panics that Recover and Go catch, with their
	// stacks, at level Error, and the first refused handoff (after which
	// connections drain here) at level Info. nil: they are not logged (a
	// panic still reaches Serve's caller as a *FatalError). The library
	// never writes to os.Stderr or the global log.
	Logger *slog.Logger
	// Handoff, when set (inherit.Set.Handoffs), hands idle HTTP/1.1
	// connections to the newest generation at drain instead of closing
	// them; a busy one goes as soon as its response is written. Without
	// it, or when no worker takes them, they drain by "Connection: close".
	Handoff *inherit.Handoffs
	// IdleGrace is how long an idle HTTP/1.1 connection that can be
	// neither handed off nor told "Connection: close" (TLS, or any without
	// Handoff) may stay idle in the drain before it is closed, provided no
	// byte of a next request has arrived (default 1s; negative: until the
	// deadline). A client that sends within the grace gets its response,
	// with Connection: close. A second drain signal closes them at once.
	IdleGrace time.Duration
}

// Server wraps an *http.Server with drain bookkeeping.
type Server struct {
	srv      *http.Server
	opts     Options
	draining atomic.Bool

	mu     sync.Mutex
	conns  map[net.Conn]*connInfo
	closed chan struct{} // signalled when a connection goes away
	// apps are the application's connections (appconn.go), hijacks the
	// hijacked ones until Hijack returns them (both under mu).
	apps      map[*appConn]struct{}
	hijacks   map[net.Conn]*appConn
	started   chan struct{} // closed when the drain begins
	hurried   chan struct{} // closed at the second drain signal
	hurryOnce sync.Once
	h2        *http.Server // serves HTTP/2, for GOAWAY (conns.go); nil: none
	bad       error        // what Serve refuses to serve (checkHandler)

	h2cOnce   sync.Once // the warning about x/net's h2c
	fatalOnce sync.Once
	fatal     chan struct{} // closed by Fail
	fatalErr  error

	// Handoff (handoff.go). handoffOn is true while connections go to the
	// new generation rather than close; pendingHO counts connections taken
	// from net/http whose handoff has not been answered (under mu).
	handoffOn   atomic.Bool
	toKick      []*hconn // idle, to be kicked (under mu)
	kicked      int      // handoff kicks not yet resolved (under mu)
	queue       []*hconn // taken, not yet sent (under mu)
	inFlight    int      // batches sent, not answered (under mu)
	windowArmed bool     // a batchWindow timer runs (under mu)
	windowDue   bool     // the queue's partial batch may go (under mu)
	fallback    *fallbackListener
	pendingHO   int
	handedOff   int
	serving     sync.WaitGroup // the listeners' Serve loops

	drained  atomic.Bool // drain has returned
	closeMu  sync.Mutex
	toClose  []*hconn // handed off, our copies still open (under closeMu)
	closerOn bool     // closeCopies' goroutine runs (under closeMu)
	closing  sync.WaitGroup

	// testInPlaceWoken, a test hook, runs when the socket wakes a read
	// whose connection was taken in place (hconn.read).
	testInPlaceWoken func()
}

// FatalError is returned by Serve after a drain that Fail started (a
// handler panic caught by Recover, a goroutine's by Go). The process should
// exit non-zero so that the supervisor counts it; upgrader has already
// started its replacement when it received STOPPING=1.
type FatalError struct{ Err error }

func (e *FatalError) Error() string { return "drained after a fatal error: " + e.Err.Error() }
func (e *FatalError) Unwrap() error { return e.Err }

// Serve is New(srv, opts).Serve(ctx, listeners).
func Serve(ctx context.Context, srv *http.Server, listeners []net.Listener, opts Options) error {
	return New(srv, opts).Serve(ctx, listeners)
}

// New prepares srv for draining: it installs its own srv.ConnState and
// srv.ConnContext (calling the ones already set) and wraps srv.Handler with
// the Connection: close marking and, unless Options.NoRecover, with Recover.
// Set all three before calling New.
func New(srv *http.Server, opts Options) *Server {
	if opts.Timeout <= 0 {
		opts.Timeout = 25 * time.Second
	}
	if len(opts.Signals) == 0 {
		opts.Signals = []os.Signal{syscall.SIGTERM, syscall.SIGINT}
	}
	if opts.IdleGrace == 0 {
		opts.IdleGrace = time.Second
	}
	s := &Server{srv: srv, opts: opts, conns: make(map[net.Conn]*connInfo),
		closed: make(chan struct{}, 1), fatal: make(chan struct{}),
		apps: make(map[*appConn]struct{}), hijacks: make(map[net.Conn]*appConn),
		started: make(chan struct{}), hurried: make(chan struct{}),
		fallback: &fallbackListener{ch: make(chan net.Conn), done: make(chan struct{})}}
	s.handoffOn.Store(opts.Handoff != nil)
	userHook := srv.ConnState
	srv.ConnState = func(c net.Conn, st http.ConnState) {
		s.track(c, st)
		if userHook != nil {
			userHook(c, st)
		}
	}
	h := srv.Handler
	if h == nil {
		h = http.DefaultServeMux
	}
	s.bad = checkHandler(h)
	s.setupHTTP2()
	userCtx := srv.ConnContext
	srv.ConnContext = func(ctx context.Context, c net.Conn) context.Context {
		if userCtx != nil {
			ctx = userCtx(ctx, c)
		}
		s.mu.Lock()
		info := s.registerLocked(c)
		s.mu.Unlock()
		ctx = context.WithValue(ctx, connKey{}, c)
		ctx = context.WithValue(ctx, infoKey{}, info)
		return context.WithValue(ctx, serverKey{}, s)
	}
	if !opts.NoRecover {
		h = s.Recover(h)
	}
	srv.Handler = s.wrap(h)
	return s
}

// Serve serves on every listener until one of the drain signals arrives,
// ctx is done, the process has upgraded itself in embedded mode
// (inherit.Upgraded), or Fail is called; then it drains and returns: nil, or a
// *FatalError after Fail. It sends READY=1 once serving unless
// Options.NoReady.
//
// Serve owns the listeners: it closes every one before it returns (at the
// drain, so that the other generation takes what is queued on the shared
// sockets). It returns early, with no drain, when READY=1 cannot be sent or
// a listener fails other than by being closed: then it closes the
// listeners and srv (srv.Close, dropping its connections), and returns
// only once none of its Serve loops runs. The handoff listener
// (Options.Handoff.Listener("http")) is closed with them.
func (s *Server) Serve(ctx context.Context, listeners []net.Listener) error {
	srv, opts := s.srv, s.opts
	if s.bad != nil {
		s.closeListeners(listeners)
		return s.bad
	}
	// A channel of its own rather than signal.NotifyContext, whose
	// goroutine would stand between the signal and the drain: one wake-up
	// less of a process that the drain signal finds idle.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, opts.Signals...)
	defer signal.Stop(sigs)
	errc := make(chan error, len(listeners))
	if hl := opts.Handoff.Listener("http"); hl != nil {
		// Connections handed to us. This listener ends when the channel
		// does, which is no reason to stop serving the others.
		s.serving.Add(1)
		go func() {
			defer s.serving.Done()
			srv.Serve(handoffListener{hl, s})
		}()
		listeners = append(listeners[:len(listeners):len(listeners)], hl)
	}
	if opts.Handoff != nil {
		go srv.Serve(s.fallback)
	}
	for _, l := range listeners[:cap(errc)] {
		s.serving.Add(1)
		go func() {
			defer s.serving.Done()
			l := net.Listener(handoffListener{l, s})
			err := srv.Serve(l)
			if s.draining.Load() {
				err = nil // our own Close
			}
			errc <- err
		}()
	}
	if !opts.NoReady {
		if err := inherit.Ready(); err != nil {
			s.abort(listeners)
			return err
		}
	}
	select {
	case <-ctx.Done():
	case <-sigs:
	case <-inherit.Upgraded(): // embedded mode: the new process is ready
	case <-s.fatal:
	case err := <-errc:
		if err != nil {
			s.abort(listeners)
			return err
		}
	}
	s.drain(listeners)
	select {
	case <-s.fatal:
		return &FatalError{s.fatalErr}
	default:
		return nil
	}
}

// Fail starts the drain because of a fatal error: the worker announces
// STOPPING=1 (so that upgrader starts its replacement at once), stops
// accepting, finishes its other in-flight requests, and Serve returns a
// *FatalError. Only the first call counts.
func (s *Server) Fail(err error) {
	s.fatalOnce.Do(func() {
		s.fatalErr = err
		close(s.fatal)
	})
}

// Recover wraps h so that a panic in it answers that request with 500
// (when nothing was written yet) and calls Fail: the auto-restart pattern
// of Node.js cluster. The panic goes to Options.Logger.
// http.ErrAbortHandler passes through, as net/http expects. New applies it
// to srv.Handler already, unless Options.NoRecover.
func (s *Server) Recover(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			v := recover()
			if v == nil {
				return
			}
			if v == http.ErrAbortHandler {
				panic(v)
			}
			err := fmt.Errorf("panic serving %s %s: %v", r.Method, r.URL.Path, v)
			s.logPanic(err)
			w.Header().Set("Connection", "close")
			w.WriteHeader(http.StatusInternalServerError)
			s.Fail(err)
		}()
		h.ServeHTTP(w, r)
	})
}

// Go runs f on a new goroutine; if f panics, the panic goes to
// Options.Logger and Fail is called instead of crashing the process with
// requests in flight.
func (s *Server) Go(f func()) {
	go func() {
		defer func() {
			if v := recover(); v != nil {
				err := fmt.Errorf("panic in background goroutine: %v", v)
				s.logPanic(err)
				s.Fail(err)
			}
		}()
		f()
	}()
}

// logPanic reports a caught panic with the stack of the goroutine that
// panicked (called from its deferred recover, so the stack is still there).
func (s *Server) logPanic(err error) {
	if s.opts.Logger != nil {
		s.opts.Logger.Error("drain: caught a panic, draining the worker", "error", err, "stack", string(debug.Stack()))
	}
}

func (s *Server) drain(listeners []net.Listener) {
	deadline := time.Now().Add(s.opts.Timeout)
	// Whatever copies of handed-off connections are still open close now,
	// handoff over or not, should the process live on after Serve.
	defer func() {
		s.drained.Store(true)
		s.closeCopies(nil)
	}()
	_ = inherit.Notify("STOPPING=1")
	// A second drain signal: close what is idle now (upgrader sends it to
	// the oldest generation when too many drain at once). Caught before
	// anyone hears the drain began, so that none can be missed.
	again := make(chan os.Signal, 1)
	signal.Notify(again, s.opts.Signals...)
	defer signal.Stop(again)
	s.draining.Store(true)
	close(s.started)
	s.goAway()
	if s.opts.OnDrain != nil {
		s.opts.OnDrain()
	}
	// Stop accepting. The sockets stay open in the supervisor and in the
	// other generation, so nothing queued on them is lost.
	s.closeListeners(listeners)

	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	// net/http registers an accepted connection (StateNew) before its Serve
	// loop can return: once they all have, counting cannot miss one caught
	// between Accept and its registration, and exit with it.
	served := make(chan struct{})
	go func() {
		s.serving.Wait()
		close(served)
	}()
	select {
	case <-served:
	case <-timer.C:
		s.closeAll()
		return
	}
	// Idle connections go to the new generation now; the others when
	// their response is written (track, on StateIdle). What cannot go
	// closes once it has been idle a while.
	s.kickIdle()
	s.planIdleClose(s.idleConns(), s.opts.IdleGrace)
	for s.open() > 0 {
		select {
		case <-again:
			s.hurry()
		case <-s.closed:
		case <-timer.C:
			// Deadline: whatever is left is closed now.
			s.closeAll()
			return
		}
	}
	s.fallback.Close()
	// Nothing is left, so Shutdown cannot drop a request.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = s.srv.Shutdown(ctx)
}

// closeAll closes every connection left at the deadline.
func (s *Server) closeAll() {
	s.srv.Close()
	s.fallback.Close()
	s.closeApps()
}

// abort stops serving without a drain, and waits for the Serve loops.
func (s *Server) abort(listeners []net.Listener) {
	s.closeListeners(listeners)
	s.closeAll()
	s.serving.Wait()
}

func (s *Server) closeListeners(ls []net.Listener) {
	for _, l := range ls {
		l.Close()
	}
}

func (s *Server) track(c net.Conn, st http.ConnState) {
	hc, _ := c.(*hconn)
	if hc != nil && st != http.StateClosed && st != http.StateHijacked {
		between := st == http.StateIdle || st == http.StateNew
		hc.setIdle(between, st == http.StateNew)
		if between && s.draining.Load() && s.handoffOn.Load() {
			s.kickOne(hc)
		}
	}
	if hc != nil && st == http.StateClosed {
		// A taken connection's last word from the serve loop that let go
		// of it: a refusal may give it back now (refuse).
		hc.mu.Lock()
		if hc.released != nil {
			select {
			case <-hc.released:
			default:
				close(hc.released)
			}
		}
		// Its serve loop has ended: no read is left to resolve a handoff
		// kick (one that came after its last read), and none may come.
		pending := hc.kicked && !hc.closeWant
		if pending {
			hc.kicked, hc.want = false, false
		}
		hc.idle = false
		hc.mu.Unlock()
		if pending {
			s.kickResolved()
		}
	}
	var plan []idleCheck
	s.mu.Lock()
	switch st {
	case http.StateHijacked:
		// The application's from now on: counted as such under the same
		// lock, so that the drain never sees it in neither set.
		delete(s.conns, c)
		ac := &appConn{Conn: c, s: s}
		s.apps[ac] = struct{}{}
		s.hijacks[c] = ac
	case http.StateClosed:
		delete(s.conns, c)
		s.signalClosed()
	case http.StateNew:
		info := s.registerLocked(c)
		info.seq++
		// New during the drain (one accepted just before the listener
		// closed, or given back by a refused handoff, which net/http
		// reports new again): if it cannot go, it closes once idle for
		// the grace, as an idle one does, unless a request arrives.
		if s.draining.Load() && s.idleCloseLocked(c, info) {
			plan = []idleCheck{{c: c, info: info, seq: info.seq}}
		}
	default:
		// Only connections registered at StateNew count: an HTTP/2
		// server run on a hijacked connection (x/net's h2c) reports
		// states of a connection net/http never reports closed.
		if info, ok := s.conns[c]; ok {
			info.state = st
			info.seq++
			if st == http.StateIdle && s.draining.Load() && s.idleCloseLocked(c, info) {
				plan = []idleCheck{{c: c, info: info, seq: info.seq}}
			}
		}
	}
	s.mu.Unlock()
	if plan != nil {
		s.planIdleClose(plan, s.opts.IdleGrace)
	}
}

func (s *Server) signalClosed() {
	select {
	case s.closed <- struct{}{}:
	default:
	}
}

// open counts connections still served here or waiting for a handoff
// answer.
func (s *Server) open() int {
	s.mu.Lock()
	n := len(s.conns) + s.pendingHO + len(s.apps)
	s.mu.Unlock()
	// Connections handed to us and not accepted yet.
	return n + s.opts.Handoff.Listener("http").Pending()
}

// HandedOff reports how many connections went to the new generation.
func (s *Server) HandedOff() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.handedOff
}

// Draining reports whether the drain has begun.
func (s *Server) Draining() bool { return s.draining.Load() }

// wrap makes every response written once the drain has begun carry
// "Connection: close", so net/http closes the connection right after it
// instead of keeping it idle.
func (s *Server) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if info, ok := r.Context().Value(infoKey{}).(*connInfo); ok {
			if r.ProtoMajor != 1 {
				info.h2.Store(true)
			} else if !info.http1.Load() {
				info.http1.Store(true)
			}
		}
		cw := &closeWriter{ResponseWriter: w, s: s, r: r}
		if hc, ok := r.Context().Value(connKey{}).(*hconn); ok && r.ProtoMajor == 1 {
			cw.hc = hc
		}
		h.ServeHTTP(cw, r)
		// A handler that wrote nothing: net/http writes the response after
		// this returns, so the header still takes effect.
		if !cw.wrote && cw.closing() {
			w.Header().Set("Connection", "close")
		}
	})
}

type closeWriter struct {
	http.ResponseWriter
	s     *Server
	r     *http.Request
	wrote bool
	hc    *hconn // its HTTP/1.x connection, if it can be handed off
}

// closing reports whether this response should end its connection: when
// draining, unless the connection will be handed off instead.
func (w *closeWriter) closing() bool {
	if !w.s.draining.Load() {
		return false
	}
	if w.hc == nil || !w.s.handoffOn.Load() {
		return true
	}
	return !w.hc.handable()
}

func (w *closeWriter) WriteHeader(code int) {
	if !w.wrote {
		w.wrote = true
		if w.closing() {
			w.Header().Set("Connection", "close")
		}
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *closeWriter) Write(b []byte) (int, error) {
	if !w.wrote {
		w.WriteHeader(http.StatusOK)
	}
	return w.ResponseWriter.Write(b)
}

// ReadFrom keeps net/http's own ReadFrom reachable, so that io.Copy to the
// response (http.FileServer does it) can use sendfile(2) on the connection.
// Like Write, it decides Connection: close before the header goes out.
func (w *closeWriter) ReadFrom(r io.Reader) (int64, error) {
	if !w.wrote {
		w.WriteHeader(http.StatusOK)
	}
	if rf, ok := w.ResponseWriter.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(writerOnly{w.ResponseWriter}, r)
}

// Unwrap lets http.ResponseController reach the real writer.
func (w *closeWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Flush implements http.Flusher for handlers that assert it.
func (w *closeWriter) Flush() {
	if !w.wrote {
		w.WriteHeader(http.StatusOK)
	}
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}
