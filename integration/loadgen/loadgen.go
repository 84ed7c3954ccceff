// Package loadgen is a raw HTTP/1.1 load generator for zero-downtime tests.
//
// It writes POST requests by hand over net.Conn and never retries, unlike
// net/http's client, which silently replays requests on reused connections
// and so hides exactly the failures an upgrade can cause. Every request ends
// in one outcome class; latencies are kept for percentiles.
package loadgen

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/textproto"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Mode is how clients use connections.
type Mode string

const (
	// NewConn opens a new connection per request (Connection: close).
	NewConn Mode = "new"
	// KeepAlive reuses each connection until the server closes it with
	// "Connection: close", idling a random 0..MaxIdle between requests.
	KeepAlive Mode = "keepalive"
)

// Class is the outcome of one request.
type Class string

const (
	OK      Class = "ok"
	Non2xx  Class = "non2xx"
	Refused Class = "refused"   // connect: ECONNREFUSED
	Reset   Class = "reset"     // ECONNRESET or EPIPE while sending or reading
	EOF     Class = "eof"       // the connection ended before a whole response
	Timeout Class = "timeout"   // no whole response within Config.Timeout
	Other   Class = "other"     // anything else (address exhaustion, parse error…)
	Malform Class = "malformed" // a response that is not HTTP/1.1
)

// Classes lists every class, OK first.
var Classes = []Class{OK, Non2xx, Refused, Reset, EOF, Timeout, Malform, Other}

// Config is one load run.
type Config struct {
	Network string // "tcp" (default) or "unix"
	Addr    string // HOST:PORT or socket path
	Path    string // request target (default "/")
	Clients int    // concurrent clients (default 16)
	Mode    Mode   // default NewConn
	// Duration bounds the run; Requests, if > 0, bounds each client too.
	Duration time.Duration
	Requests int
	// MaxIdle is the largest random idle gap between requests on a
	// keep-alive connection.
	MaxIdle time.Duration
	// Timeout bounds one request, connect included (default 10s).
	Timeout time.Duration
	// Body is the POST body (default 16 bytes).
	Body []byte
	// OnOK, if set, is called with the X-Generation of every OK response,
	// from the clients' goroutines, so that a test can wait on what the
	// load has seen.
	OnOK func(generation string)
}

// Result is what a run saw.
type Result struct {
	Requests int
	Counts   map[Class]int
	// Generations counts OK responses by their X-Generation header.
	Generations map[string]int
	// ServerCloses counts responses that carried "Connection: close" on a
	// keep-alive client: the server ended the connection the polite way.
	ServerCloses int
	// ClosedUnderClient counts keep-alive connections the server ended
	// without saying so first (a failed request on a reused connection).
	ClosedUnderClient int
	// ConnsAcrossGenerations counts keep-alive connections answered by
	// more than one generation (handed off while open); GenerationRegress
	// counts responses from an older generation than an earlier one on the
	// same connection.
	ConnsAcrossGenerations int
	GenerationRegress      int
	// Samples holds the first few failures, described.
	Samples []string
	Elapsed time.Duration
	P50     time.Duration
	P90     time.Duration
	P99     time.Duration
	Max     time.Duration
}

// Failed is the number of requests that did not end OK.
func (r Result) Failed() int { return r.Requests - r.Counts[OK] }

// RPS is OK responses per second.
func (r Result) RPS() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Counts[OK]) / r.Elapsed.Seconds()
}

func (r Result) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d requests in %s (%.0f ok/s):", r.Requests, r.Elapsed.Round(time.Millisecond), r.RPS())
	for _, c := range Classes {
		fmt.Fprintf(&b, " %s=%d", c, r.Counts[c])
	}
	fmt.Fprintf(&b, "; latency p50=%s p90=%s p99=%s max=%s", r.P50, r.P90, r.P99, r.Max)
	if r.ServerCloses > 0 || r.ClosedUnderClient > 0 {
		fmt.Fprintf(&b, "; server closes: %d polite, %d under the client", r.ServerCloses, r.ClosedUnderClient)
	}
	if r.ConnsAcrossGenerations > 0 || r.GenerationRegress > 0 {
		fmt.Fprintf(&b, "; %d connections answered by several generations (%d regressions)", r.ConnsAcrossGenerations, r.GenerationRegress)
	}
	for _, s := range r.Samples {
		b.WriteString("\n  failure: " + s)
	}
	return b.String()
}

// Run runs the load until ctx is done, cfg.Duration has passed, or every
// client has sent cfg.Requests.
func Run(ctx context.Context, cfg Config) Result {
	if cfg.Network == "" {
		cfg.Network = "tcp"
	}
	if cfg.Path == "" {
		cfg.Path = "/"
	}
	if cfg.Clients <= 0 {
		cfg.Clients = 16
	}
	if cfg.Mode == "" {
		cfg.Mode = NewConn
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	if cfg.Body == nil {
		cfg.Body = []byte("0123456789abcdef")
	}
	if cfg.Duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cfg.Duration)
		defer cancel()
	}
	start := time.Now()
	var wg sync.WaitGroup
	clients := make([]*client, cfg.Clients)
	for i := range clients {
		c := &client{cfg: &cfg, counts: map[Class]int{}, gens: map[string]int{}}
		clients[i] = c
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.run(ctx)
		}()
	}
	wg.Wait()
	r := Result{Counts: map[Class]int{}, Generations: map[string]int{}, Elapsed: time.Since(start)}
	var lat []time.Duration
	for _, c := range clients {
		for k, v := range c.counts {
			r.Counts[k] += v
			r.Requests += v
		}
		for k, v := range c.gens {
			r.Generations[k] += v
		}
		r.ServerCloses += c.serverCloses
		r.ClosedUnderClient += c.closedUnder
		r.ConnsAcrossGenerations += c.across
		r.GenerationRegress += c.regress
		for _, s := range c.samples {
			if len(r.Samples) < 10 {
				r.Samples = append(r.Samples, s)
			}
		}
		lat = append(lat, c.lat...)
	}
	if len(lat) > 0 {
		slices.Sort(lat)
		pct := func(p float64) time.Duration { return lat[min(len(lat)-1, int(p*float64(len(lat))))] }
		r.P50, r.P90, r.P99, r.Max = pct(0.50), pct(0.90), pct(0.99), lat[len(lat)-1]
	}
	return r
}

type client struct {
	cfg          *Config
	counts       map[Class]int
	gens         map[string]int
	lat          []time.Duration
	samples      []string
	serverCloses int
	closedUnder  int
	conn         net.Conn
	br           *bufio.Reader
	reused       bool
	// The current connection's first and last generation seen.
	firstGen, lastGen int
	across, regress   int
}

func (c *client) run(ctx context.Context) {
	defer c.close()
	for n := 0; c.cfg.Requests <= 0 || n < c.cfg.Requests; n++ {
		if ctx.Err() != nil {
			return
		}
		if c.cfg.Mode == KeepAlive && c.conn != nil && c.cfg.MaxIdle > 0 {
			idle := time.Duration(rand.Int64N(int64(c.cfg.MaxIdle) + 1))
			select {
			case <-ctx.Done():
				return
			case <-time.After(idle):
			}
		}
		c.one()
	}
}

func (c *client) close() {
	if c.conn != nil {
		c.conn.Close()
		if c.lastGen != c.firstGen {
			c.across++
		}
		c.conn, c.br, c.reused = nil, nil, false
		c.firstGen, c.lastGen = 0, 0
	}
}

// seen records the generation that answered on the current connection.
func (c *client) seen(gen string) {
	g, err := strconv.Atoi(gen)
	if err != nil {
		return
	}
	if c.firstGen == 0 {
		c.firstGen = g
	}
	if g < c.lastGen {
		c.regress++
	}
	c.lastGen = g
}

// one sends one request and records its outcome. It never retries.
func (c *client) one() {
	start := time.Now()
	deadline := start.Add(c.cfg.Timeout)
	class, detail, gen, closeAfter := c.exchange(deadline)
	c.counts[class]++
	if class == OK {
		c.lat = append(c.lat, time.Since(start))
		c.gens[gen]++
		c.seen(gen)
		if c.cfg.OnOK != nil {
			c.cfg.OnOK(gen)
		}
	} else {
		if c.reused && class != Non2xx {
			c.closedUnder++
		}
		if len(c.samples) < 10 {
			c.samples = append(c.samples, fmt.Sprintf("%s at %s (reused connection: %v): %s",
				class, start.Format("15:04:05.000"), c.reused, detail))
		}
	}
	switch {
	case class != OK && class != Non2xx, c.cfg.Mode == NewConn:
		c.close()
	case closeAfter:
		c.serverCloses++
		c.close()
	default:
		c.reused = true
	}
}

func (c *client) exchange(deadline time.Time) (class Class, detail, gen string, closeAfter bool) {
	if c.conn == nil {
		d := net.Dialer{Deadline: deadline}
		conn, err := d.Dial(c.cfg.Network, c.cfg.Addr)
		if err != nil {
			return classify(err, false), "connect: " + err.Error(), "", false
		}
		c.conn, c.br = conn, bufio.NewReader(conn)
	}
	c.conn.SetDeadline(deadline)
	connHdr := ""
	if c.cfg.Mode == NewConn {
		connHdr = "Connection: close\r\n"
	}
	req := fmt.Sprintf("POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n",
		c.cfg.Path, c.cfg.Addr, len(c.cfg.Body), connHdr)
	if _, err := c.conn.Write(append([]byte(req), c.cfg.Body...)); err != nil {
		return classify(err, false), "write: " + err.Error(), "", false
	}
	tp := textproto.NewReader(c.br)
	line, err := tp.ReadLine()
	if err != nil {
		return classify(err, true), "read status line: " + err.Error(), "", false
	}
	proto, rest, _ := strings.Cut(line, " ")
	codeStr, _, _ := strings.Cut(rest, " ")
	code, cerr := strconv.Atoi(codeStr)
	if !strings.HasPrefix(proto, "HTTP/1.") || cerr != nil {
		return Malform, fmt.Sprintf("status line %q", line), "", false
	}
	hdr, err := tp.ReadMIMEHeader()
	if err != nil {
		return classify(err, true), "read headers: " + err.Error(), "", false
	}
	closeAfter = strings.EqualFold(hdr.Get("Connection"), "close") || proto == "HTTP/1.0"
	switch {
	case strings.EqualFold(hdr.Get("Transfer-Encoding"), "chunked"):
		err = readChunked(c.br)
	case hdr.Get("Content-Length") != "":
		n, perr := strconv.ParseInt(hdr.Get("Content-Length"), 10, 64)
		if perr != nil {
			return Malform, "Content-Length " + hdr.Get("Content-Length"), "", false
		}
		_, err = io.CopyN(io.Discard, c.br, n)
	default:
		_, err = io.Copy(io.Discard, c.br)
		closeAfter = true
	}
	if err != nil {
		return classify(err, true), "read body: " + err.Error(), "", false
	}
	if code < 200 || code > 299 {
		return Non2xx, line, "", closeAfter
	}
	return OK, "", hdr.Get("X-Generation"), closeAfter
}

func readChunked(br *bufio.Reader) error {
	tp := textproto.NewReader(br)
	for {
		line, err := tp.ReadLine()
		if err != nil {
			return err
		}
		size, err := strconv.ParseInt(strings.TrimSpace(strings.SplitN(line, ";", 2)[0]), 16, 64)
		if err != nil {
			return fmt.Errorf("chunk size %q: %w", line, err)
		}
		if size == 0 {
			_, err := tp.ReadMIMEHeader() // trailers and the final CRLF
			return err
		}
		if _, err := io.CopyN(io.Discard, br, size+2); err != nil {
			return err
		}
	}
}

func classify(err error, reading bool) Class {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return Refused
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return Reset
	case errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return Timeout
	case reading && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)):
		return EOF
	}
	return Other
}
