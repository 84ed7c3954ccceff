// Package health serves the supervisor's state over HTTP for load
// balancers, operators and Prometheus:
//
//	GET /livez    200 while the supervisor's loop answers, else 503
//	GET /readyz   200 while a generation serves and no stop has begun, else 503
//	GET /status   the status snapshot as JSON
//	GET /metrics  Prometheus text format (prometheus/client_golang)
//
// It knows nothing of how the supervisor works: it serves the Snapshot that
// its Source hands it.
package health

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Snapshot is the state at one moment.
type Snapshot struct {
	// Ready is what /readyz reports; Reason says why not.
	Ready  bool
	Reason string
	// Generations counts generations by state, for the
	// upgrader_generations gauge.
	Generations map[string]int
	// Status is rendered as /status JSON.
	Status any
}

// Source takes a snapshot. An error (the loop did not answer within ctx)
// makes /livez fail.
type Source func(ctx context.Context) (Snapshot, error)

// probeTimeout bounds how long a probe waits for the supervisor's loop.
const probeTimeout = 2 * time.Second

// Server is the HTTP side. Its Observe methods are safe for concurrent use.
type Server struct {
	src        Source
	reg        *prometheus.Registry
	upgrades   *prometheus.CounterVec
	upgradeDur prometheus.Histogram
	restarts   *prometheus.CounterVec
	genDesc    *prometheus.Desc
	readyDesc  *prometheus.Desc

	mu   sync.Mutex
	srv  *http.Server // while Serve runs
	gate *gate
}

// New returns a Server that asks src for the state at every request.
func New(src Source) *Server {
	s := &Server{
		src: src,
		reg: prometheus.NewRegistry(),
		upgrades: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "upgrader_upgrades_total", Help: "Upgrades by result (ok, failed).",
		}, []string{"result"}),
		upgradeDur: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "upgrader_upgrade_duration_seconds",
			Help:    "From the start of a new generation until all its workers were ready, or it failed.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 14),
		}),
		restarts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "upgrader_worker_restarts_total", Help: "Workers replaced unasked, by cause (exit, stopping, watchdog).",
		}, []string{"cause"}),
		genDesc:   prometheus.NewDesc("upgrader_generations", "Generations with live processes, by state.", []string{"state"}, nil),
		readyDesc: prometheus.NewDesc("upgrader_ready", "1 while a generation serves and no stop has begun.", nil, nil),
	}
	s.upgrades.WithLabelValues("ok")
	s.upgrades.WithLabelValues("failed")
	for _, cause := range []string{"exit", "stopping", "watchdog"} {
		s.restarts.WithLabelValues(cause)
	}
	s.reg.MustRegister(s.upgrades, s.upgradeDur, s.restarts, s,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return s
}

// ObserveUpgrade records a finished upgrade and how long it took.
func (s *Server) ObserveUpgrade(ok bool, d time.Duration) {
	result := "failed"
	if ok {
		result = "ok"
	}
	s.upgrades.WithLabelValues(result).Inc()
	s.upgradeDur.Observe(d.Seconds())
}

// ObserveRestart records a worker replaced unasked.
func (s *Server) ObserveRestart(cause string) { s.restarts.WithLabelValues(cause).Inc() }

// Describe implements prometheus.Collector for the state-derived gauges.
func (s *Server) Describe(ch chan<- *prometheus.Desc) {
	ch <- s.genDesc
	ch <- s.readyDesc
}

// Collect implements prometheus.Collector.
func (s *Server) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), probeTimeout)
	defer cancel()
	snap, err := s.src(ctx)
	if err != nil {
		return
	}
	for _, state := range []string{"starting", "active", "draining", "failed"} {
		ch <- prometheus.MustNewConstMetric(s.genDesc, prometheus.GaugeValue, float64(snap.Generations[state]), state)
	}
	ready := 0.0
	if snap.Ready {
		ready = 1
	}
	ch <- prometheus.MustNewConstMetric(s.readyDesc, prometheus.GaugeValue, ready)
}

// Handler serves the four endpoints.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /livez", func(w http.ResponseWriter, r *http.Request) {
		if _, err := s.snapshot(r.Context()); err != nil {
			http.Error(w, "not live: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		snap, err := s.snapshot(r.Context())
		switch {
		case err != nil:
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
		case !snap.Ready:
			http.Error(w, "not ready: "+snap.Reason, http.StatusServiceUnavailable)
		default:
			fmt.Fprintln(w, "ready")
		}
	})
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		snap, err := s.snapshot(r.Context())
		if err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(snap.Status)
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{}))
	return mux
}

func (s *Server) snapshot(ctx context.Context) (Snapshot, error) {
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	return s.src(ctx)
}

// Listen binds addr (HOST:PORT) for the health endpoints; the error names
// --health and the address.
func Listen(addr string) (net.Listener, error) {
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return nil, fmt.Errorf("--health %q: want HOST:PORT: %w", addr, err)
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--health %q: %w", addr, err)
	}
	return l, nil
}

// Serve serves the endpoints on l until ctx is done.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 5 * time.Second}
	g := newGate(l)
	l = g
	s.mu.Lock()
	s.srv, s.gate = srv, g
	s.mu.Unlock()
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Quiesce stops taking connections on Serve's listener without closing it,
// so that those arriving wait in its queue (for the next image of a
// self-upgrade, which carries the listener), closes idle connections, and
// waits up to timeout for the connections under way to be answered and
// closed. resume takes connections again. Without Serve running it does
// nothing.
func (s *Server) Quiesce(timeout time.Duration) (resume func()) {
	s.mu.Lock()
	srv, g := s.srv, s.gate
	s.mu.Unlock()
	if srv == nil {
		return func() {}
	}
	g.pause()
	srv.SetKeepAlivesEnabled(false) // closes the idle ones; the others after their answer
	for deadline := time.Now().Add(timeout); !g.quiet() && time.Now().Before(deadline); {
		time.Sleep(2 * time.Millisecond) // polling interval
	}
	return func() {
		srv.SetKeepAlivesEnabled(true)
		g.resume()
	}
}

// gate is a listener whose Accept can be paused without closing it, and
// that counts the connections it has handed out and not yet closed.
type gate struct {
	net.Listener
	mu     sync.Mutex
	cond   *sync.Cond
	paused bool
	parked bool // Accept is held by pause (so no connection is on its way)
	conns  int
}

func newGate(l net.Listener) *gate {
	g := &gate{Listener: l}
	g.cond = sync.NewCond(&g.mu)
	return g
}

// deadliner is a listener with SetDeadline (TCP and Unix listeners).
type deadliner interface{ SetDeadline(time.Time) error }

func (g *gate) Accept() (net.Conn, error) {
	for {
		g.mu.Lock()
		for g.paused {
			g.parked = true
			g.cond.Wait()
		}
		g.parked = false
		g.mu.Unlock()
		c, err := g.Listener.Accept()
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				continue // woken by pause
			}
			return nil, err
		}
		g.mu.Lock()
		g.conns++
		g.mu.Unlock()
		return &gateConn{Conn: c, g: g}, nil
	}
}

// pause wakes an Accept under way (a deadline in the past) and holds the
// next ones.
func (g *gate) pause() {
	g.mu.Lock()
	g.paused = true
	g.mu.Unlock()
	if d, ok := g.Listener.(deadliner); ok {
		d.SetDeadline(time.Now())
	}
}

func (g *gate) resume() {
	if d, ok := g.Listener.(deadliner); ok {
		d.SetDeadline(time.Time{})
	}
	g.mu.Lock()
	g.paused = false
	g.cond.Broadcast()
	g.mu.Unlock()
}

// quiet: Accept is held and every connection it handed out is closed. A
// connection accepted as pause came is counted before Accept is held.
func (g *gate) quiet() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.parked && g.conns == 0
}

// gateConn counts itself out of its gate when closed.
type gateConn struct {
	net.Conn
	g    *gate
	once sync.Once
}

func (c *gateConn) Close() error {
	c.once.Do(func() {
		c.g.mu.Lock()
		c.g.conns--
		c.g.mu.Unlock()
	})
	return c.Conn.Close()
}
