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
	"container/list"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"
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
	connsDesc  *prometheus.Desc
	closedDesc *prometheus.Desc

	mu       sync.Mutex
	maxConns int
	srv      *http.Server // while Serve runs
	gate     *gate
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
		connsDesc: prometheus.NewDesc("upgrader_health_connections", "Connections to the health endpoints open now.", nil, nil),
		closedDesc: prometheus.NewDesc("upgrader_health_connections_closed_total",
			"Health connections closed at the bound on them, by reason (idle: the one idle the longest, for a new one; refused: a new one, answered 503).", []string{"reason"}, nil),
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
	ch <- s.connsDesc
	ch <- s.closedDesc
}

// Collect implements prometheus.Collector.
func (s *Server) Collect(ch chan<- prometheus.Metric) {
	s.mu.Lock()
	g := s.gate
	s.mu.Unlock()
	if g != nil {
		g.mu.Lock()
		conns, evicted, refused := g.conns, g.evicted, g.refused
		g.mu.Unlock()
		ch <- prometheus.MustNewConstMetric(s.connsDesc, prometheus.GaugeValue, float64(conns))
		ch <- prometheus.MustNewConstMetric(s.closedDesc, prometheus.CounterValue, float64(evicted), "idle")
		ch <- prometheus.MustNewConstMetric(s.closedDesc, prometheus.CounterValue, float64(refused), "refused")
	}
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

// The limits of one connection: a client that sends nothing, sends
// slowly, reads slowly or idles between probes lets go of its fd within
// these; a balancer that probes every few seconds keeps its connection.
const (
	readHeaderTimeout = 5 * time.Second
	readTimeout       = 10 * time.Second
	writeTimeout      = 10 * time.Second
	idleTimeout       = 30 * time.Second
	maxHeaderBytes    = 16 << 10
)

// The bounds of MaxConns: the most connections worth holding for
// balancers' probes, and the fewest it gives when the fd limit leaves
// almost nothing.
const (
	maxConnsCeiling = 512
	maxConnsFloor   = 4
)

// MaxConns is how many health connections to hold at once when the
// supervisor needs reserve fds of its own: half of what RLIMIT_NOFILE
// leaves beyond the reserve (the other half is slack for what the reserve
// does not foresee), within maxConnsFloor and maxConnsCeiling. limit is
// the soft RLIMIT_NOFILE it read.
func MaxConns(reserve int) (n int, limit uint64, err error) {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		return maxConnsFloor, 0, fmt.Errorf("health endpoints: RLIMIT_NOFILE: %w", err)
	}
	return maxConnsFor(rl.Cur, reserve), rl.Cur, nil
}

func maxConnsFor(limit uint64, reserve int) int {
	free := int64(min(limit, 1<<31)) - int64(reserve)
	return int(min(max(free/2, maxConnsFloor), maxConnsCeiling))
}

// SetMaxConns bounds the connections Serve holds at once (0: no bound). At
// the bound, a new connection closes the one idle the longest, so that a
// balancer's next probe is answered although clients hold idle
// connections; with none idle it is refused with a 503 and closed: the
// health request fails, never the supervisor, whose fds these would be.
// Call it before Serve.
func (s *Server) SetMaxConns(n int) {
	s.mu.Lock()
	s.maxConns = n
	s.mu.Unlock()
}

// Serve serves the endpoints on l until ctx is done.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	s.mu.Lock()
	g := newGate(l, s.maxConns)
	srv := &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ConnState:         g.connState,
	}
	s.srv, s.gate = srv, g
	s.mu.Unlock()
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(g); err != nil && !errors.Is(err, http.ErrServerClosed) {
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

// gate is a listener whose Accept can be paused without closing it, that
// counts the connections it has handed out and not yet closed, and holds
// at most max of them (0: no bound).
type gate struct {
	net.Listener
	max    int
	mu     sync.Mutex
	cond   *sync.Cond
	paused bool
	parked bool // Accept is held by pause (so no connection is on its way)
	conns  int
	idle   list.List // of *gateConn, the longest idle first
	// evicted and refused count connections closed for the bound.
	evicted, refused int
}

func newGate(l net.Listener, max int) *gate {
	g := &gate{Listener: l, max: max}
	g.cond = sync.NewCond(&g.mu)
	return g
}

// deadliner is a listener with SetDeadline (TCP and Unix listeners).
type deadliner interface{ SetDeadline(time.Time) error }

// refusal is written to a connection beyond the bound with none idle to
// close: a balancer counts it a failed probe, as it is.
const refusal = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 36\r\nConnection: close\r\n\r\ntoo many health connections at once\n"

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
		var victim *gateConn
		if g.max > 0 && g.conns >= g.max {
			if e := g.idle.Front(); e != nil {
				victim = g.idle.Remove(e).(*gateConn)
				victim.idle = nil
				g.evicted++
			}
		}
		full := g.max > 0 && g.conns >= g.max && victim == nil
		if full {
			g.refused++
		} else {
			g.conns++
		}
		g.mu.Unlock()
		if victim != nil {
			victim.Close() // counts itself out
		}
		if full {
			// The accepted socket's send buffer is empty: the write
			// does not wait, and the deadline bounds it if it would.
			c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
			io.WriteString(c, refusal)
			c.Close()
			continue
		}
		return &gateConn{Conn: c, g: g}, nil
	}
}

// connState keeps the list of idle connections, the ones the bound may
// close: a connection waiting for its next request. One being answered,
// or whose first request has not come, is left to the timeouts.
func (g *gate) connState(c net.Conn, state http.ConnState) {
	gc, ok := c.(*gateConn)
	if !ok {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if state == http.StateIdle && gc.idle == nil && !gc.closed {
		gc.idle = g.idle.PushBack(gc)
	} else if state != http.StateIdle && gc.idle != nil {
		g.idle.Remove(gc.idle)
		gc.idle = nil
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
	g *gate
	// Guarded by g.mu.
	idle   *list.Element // in g.idle while idle
	closed bool
}

func (c *gateConn) Close() error {
	c.g.mu.Lock()
	first := !c.closed
	if first {
		c.closed = true
		c.g.conns--
		if c.idle != nil {
			c.g.idle.Remove(c.idle)
			c.idle = nil
		}
	}
	c.g.mu.Unlock()
	return c.Conn.Close()
}

// openConns is how many connections Serve holds now.
func (s *Server) openConns() int {
	s.mu.Lock()
	g := s.gate
	s.mu.Unlock()
	if g == nil {
		return 0
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.conns
}

// idleConns is how many of them are idle between requests, the ones the
// bound may close.
func (s *Server) idleConns() int {
	s.mu.Lock()
	g := s.gate
	s.mu.Unlock()
	if g == nil {
		return 0
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.idle.Len()
}
