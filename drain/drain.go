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
package drain

import (
	"bufio"
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/seed6cb0314a/upgrader/inherit"
)

// Options tune Serve. The zero value is usable.
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
}

// Server wraps an *http.Server with drain bookkeeping.
type Server struct {
	srv      *http.Server
	opts     Options
	draining atomic.Bool

	mu     sync.Mutex
	conns  map[net.Conn]http.ConnState
	closed chan struct{} // signalled when a connection goes away
}

// Serve serves srv on every listener until one of opts.Signals arrives or
// ctx is done, then drains and returns nil. It returns early with the error
// of a listener that fails other than by being closed.
//
// Serve installs its own srv.ConnState (calling the one already set) and
// wraps srv.Handler; set both before calling it.
func Serve(ctx context.Context, srv *http.Server, listeners []net.Listener, opts Options) error {
	if opts.Timeout <= 0 {
		opts.Timeout = 25 * time.Second
	}
	if len(opts.Signals) == 0 {
		opts.Signals = []os.Signal{syscall.SIGTERM, syscall.SIGINT}
	}
	s := &Server{srv: srv, opts: opts, conns: make(map[net.Conn]http.ConnState), closed: make(chan struct{}, 1)}
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
	srv.Handler = s.wrap(h)

	ctx, stop := signal.NotifyContext(ctx, opts.Signals...)
	defer stop()
	errc := make(chan error, len(listeners))
	for _, l := range listeners {
		go func() {
			err := srv.Serve(l)
			if s.draining.Load() {
				err = nil // our own Close
			}
			errc <- err
		}()
	}
	if !opts.NoReady {
		if err := inherit.Ready(); err != nil {
			return err
		}
	}
	select {
	case <-ctx.Done():
	case err := <-errc:
		if err != nil {
			s.closeListeners(listeners)
			srv.Close()
			return err
		}
	}
	s.drain(listeners)
	return nil
}

func (s *Server) drain(listeners []net.Listener) {
	deadline := time.Now().Add(s.opts.Timeout)
	_ = inherit.Notify("STOPPING=1")
	s.draining.Store(true)
	if s.opts.OnDrain != nil {
		s.opts.OnDrain()
	}
	// Stop accepting. The sockets stay open in the supervisor and in the
	// other generation, so nothing queued on them is lost.
	s.closeListeners(listeners)

	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	for s.open() > 0 {
		select {
		case <-s.closed:
		case <-timer.C:
			// Deadline: whatever is left is closed now.
			s.srv.Close()
			return
		}
	}
	// Nothing is left, so Shutdown cannot drop a request.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = s.srv.Shutdown(ctx)
}

func (s *Server) closeListeners(ls []net.Listener) {
	for _, l := range ls {
		l.Close()
	}
}

func (s *Server) track(c net.Conn, st http.ConnState) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch st {
	case http.StateClosed, http.StateHijacked:
		delete(s.conns, c)
		select {
		case s.closed <- struct{}{}:
		default:
		}
	default:
		s.conns[c] = st
	}
}

func (s *Server) open() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// Draining reports whether the drain has begun.
func (s *Server) Draining() bool { return s.draining.Load() }

// wrap makes every response written once the drain has begun carry
// "Connection: close", so net/http closes the connection right after it
// instead of keeping it idle.
func (s *Server) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cw := &closeWriter{ResponseWriter: w, s: s}
		h.ServeHTTP(cw, r)
		// A handler that wrote nothing: net/http writes the response after
		// this returns, so the header still takes effect.
		if !cw.wrote && s.draining.Load() {
			w.Header().Set("Connection", "close")
		}
	})
}

type closeWriter struct {
	http.ResponseWriter
	s     *Server
	wrote bool
}

func (w *closeWriter) WriteHeader(code int) {
	if !w.wrote {
		w.wrote = true
		if w.s.draining.Load() {
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

// Hijack implements http.Hijacker for handlers that assert it.
func (w *closeWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	if h, ok := w.ResponseWriter.(http.Hijacker); ok {
		return h.Hijack()
	}
	return nil, nil, errors.New("drain: the underlying ResponseWriter does not support hijacking")
}
