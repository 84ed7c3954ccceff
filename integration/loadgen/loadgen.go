// Package loadgen is a raw HTTP/1.1 load generator for zero-downtime tests.
//
// It writes POST requests by hand over net.Conn and never retries, unlike
// net/http's client, which silently replays requests on reused connections
// and so hides exactly the failures an upgrade can cause. Every request ends
// in one outcome class; latencies are kept for percentiles.
//
// With Config.TLS every connection is TLS, still HTTP/1.1 (ALPN
// "http/1.1" only). Mode HTTP2 is the one exception to the raw client:
// HTTP/2 through net/http's Transport (see HTTP2 for what that may retry,
// and why it hides no failure). With Config.ExpectSize every OK body is
// checked, as it streams in, against examples/hello's ?size= pattern:
// byte i is byte(i*7 + i>>10).
package loadgen

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
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
	// HTTP2 sends each request as a stream on the client's own HTTP/2
	// connection, idling a random 0..MaxIdle between requests: HTTP/2 over
	// TLS (ALPN "h2" only) when Config.TLS is set, else HTTP/2 over
	// cleartext with prior knowledge (h2c). It goes through net/http's
	// Transport, one per client, with HTTP/2 as its only protocol. That
	// Transport replays a request on a new connection only when the server
	// said it did not process it (a stream above a GOAWAY's last stream ID,
	// or REFUSED_STREAM): HTTP/2's own guarantee (RFC 9113, section 8.7),
	// so the retry hides no failure. Anything else that goes wrong is
	// counted as in the other modes.
	HTTP2 Mode = "h2"
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
	Malform Class = "malformed" // a response that is not HTTP/1.1 (HTTP/2 in mode HTTP2)
	Corrupt Class = "corrupt"   // a whole response whose body is not the one expected (Config.ExpectSize)
	// IdleRace is a request written whole on a keep-alive connection that
	// had idled after a whole response, which then ended in order (FIN, or
	// TLS close_notify) before one byte of a response came: the server
	// closed the idle connection as the request was sent. It is the race
	// every HTTP/1.1 server closing idle connections has; real clients
	// retry such a request when it is idempotent (RFC 9112, section
	// 9.3.1; Go's Transport, whose error for it is "http: server closed
	// idle connection"), loadgen counts it. The client
	// cannot tell it from a server that read the request and closed
	// without a word: Failed counts it, and a test that tolerates it must
	// know, from the server's side, that the server does not do that. A
	// reset instead of the orderly end, any byte of a response, or a
	// connection used for the first time are the other classes.
	IdleRace Class = "idle-race"
)

// Classes lists every class, OK first.
var Classes = []Class{OK, Non2xx, Refused, Reset, EOF, IdleRace, Timeout, Malform, Corrupt, Other}

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
	// OnResponse, if set, is called for every OK response with its
	// X-Generation and the time its status line arrived, from the clients'
	// goroutines, so that a test can tell which generation served when.
	OnResponse func(generation string, headerAt time.Time)
	// OnOutcome, if set, is called once for every finished request, OK or
	// not, with its class and the time its outcome was known (the whole
	// response read, or the error seen), from the clients' goroutines, so
	// that a benchmark can draw outcomes over time. It sees exactly what
	// Result.Counts counts.
	OnOutcome func(c Class, at time.Time)
	// OnLatency, if set, is called for every OK response with the time the
	// request began (before its connect, on a new connection) and how long
	// it took until the whole response was read: what Result's percentiles
	// are computed from. From the clients' goroutines.
	OnLatency func(sent time.Time, took time.Duration)
	// OnIdleClosed, if set, is called each time a keep-alive connection is
	// found closed by the server while idle (what Result.IdleClosed
	// counts), with the time it was found, from the clients' goroutines.
	OnIdleClosed func(at time.Time)
	// TLS, if set, makes every connection TLS with this configuration; its
	// NextProtos is replaced by "http/1.1" alone, so that the connection
	// stays HTTP/1.1 whatever the server offers. ServerName defaults to
	// Addr's host.
	TLS *tls.Config
	// ExpectSize, if > 0, is the body every 2xx response must have: that
	// many bytes of examples/hello's ?size= pattern (byte i is
	// byte(i*7 + i>>10)). Any other length or content is Corrupt.
	ExpectSize int64
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
	// without saying so first (a failed request on a reused connection,
	// IdleRace included).
	ClosedUnderClient int
	// IdleClosed counts keep-alive connections the server closed while
	// they were idle, found closed before the next request was written on
	// them, as real clients find them (Go's Transport watches its idle
	// connections; curl polls one before reuse): the request then goes on
	// a new connection. Not a failure, but a cost (a new handshake), and
	// the sign of a server that closes idle connections under its clients.
	// One found closed only once the request was written is an IdleRace.
	IdleClosed int
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

// Failed is the number of requests that did not end OK, IdleRace
// included.
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
	if r.ServerCloses > 0 || r.ClosedUnderClient > 0 || r.IdleClosed > 0 {
		fmt.Fprintf(&b, "; server closes: %d polite, %d under the client, %d while idle", r.ServerCloses, r.ClosedUnderClient, r.IdleClosed)
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
	if cfg.TLS != nil {
		cfg.TLS = cfg.TLS.Clone()
		cfg.TLS.NextProtos = []string{"http/1.1"}
		if cfg.Mode == HTTP2 {
			cfg.TLS.NextProtos = []string{"h2"}
		}
		if cfg.TLS.ServerName == "" && cfg.Network == "tcp" {
			cfg.TLS.ServerName, _, _ = net.SplitHostPort(cfg.Addr)
		}
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
		if cfg.Mode == HTTP2 {
			c.h2 = newH2Client(&cfg)
		}
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
		r.IdleClosed += c.idleClosed
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
	idleClosed   int
	conn         net.Conn
	br           *bufio.Reader
	reused       bool
	h2           *http.Client // mode HTTP2
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
		if (c.cfg.Mode == KeepAlive && c.conn != nil || c.cfg.Mode == HTTP2 && n > 0) && c.cfg.MaxIdle > 0 {
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
	if c.h2 != nil {
		c.h2.CloseIdleConnections()
	}
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
	exchange := c.exchange
	if c.cfg.Mode == HTTP2 {
		exchange = c.exchangeH2
	}
	class, detail, gen, headerAt, closeAfter := exchange(deadline)
	end := time.Now()
	c.counts[class]++
	if c.cfg.OnOutcome != nil {
		c.cfg.OnOutcome(class, end)
	}
	if class == OK {
		c.lat = append(c.lat, end.Sub(start))
		if c.cfg.OnLatency != nil {
			c.cfg.OnLatency(start, end.Sub(start))
		}
		c.gens[gen]++
		if c.cfg.Mode != HTTP2 {
			c.seen(gen)
		}
		if c.cfg.OnOK != nil {
			c.cfg.OnOK(gen)
		}
		if c.cfg.OnResponse != nil {
			c.cfg.OnResponse(gen, headerAt)
		}
	} else {
		// A reused connection that failed: the server ended it under the
		// client (a wrong answer or an error status is another matter).
		if c.reused && class != Non2xx && class != Corrupt {
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
		// In mode HTTP2 the Transport owns the connections: which one a
		// request went on is not this client's to tell, so the
		// per-connection counts stay at zero.
		c.reused = c.cfg.Mode != HTTP2
	}
}

// closedWhileIdle reports whether the server has closed the idle
// connection (FIN, reset, or a TLS close_notify), without waiting when it
// has not: it peeks at the socket (recv(2) with MSG_PEEK|MSG_DONTWAIT); a
// read with a deadline already past would not even try. Bytes waiting on
// an idle TLS connection are read with a short deadline: a close_notify
// reads as EOF (a timed-out read leaves a tls.Conn usable).
func (c *client) closedWhileIdle() bool {
	if c.br.Buffered() > 0 {
		return false
	}
	raw := c.conn
	if tc, ok := raw.(*tls.Conn); ok {
		raw = tc.NetConn()
	}
	sc, ok := raw.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	var n int
	var perr error
	var b [1]byte
	rc.Read(func(fd uintptr) bool {
		n, _, perr = syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		return true // never wait
	})
	switch {
	case perr == syscall.EAGAIN:
		return false // open, nothing sent
	case perr != nil || n == 0:
		return true // reset, or FIN
	case c.cfg.TLS == nil:
		return false // bytes nobody asked for: the exchange will say
	}
	c.conn.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	_, err = c.br.Peek(1)
	c.conn.SetReadDeadline(time.Time{})
	var ne net.Error
	return err != nil && !(errors.As(err, &ne) && ne.Timeout())
}

// dial opens the client's connection, TLS included: the handshake is part
// of the connect, within the request's deadline.
func (c *client) dial(deadline time.Time) (Class, string) {
	d := net.Dialer{Deadline: deadline}
	conn, err := d.Dial(c.cfg.Network, c.cfg.Addr)
	if err != nil {
		return classify(err, false), "connect: " + err.Error()
	}
	if c.cfg.TLS != nil {
		tc := tls.Client(conn, c.cfg.TLS)
		tc.SetDeadline(deadline)
		if err := tc.Handshake(); err != nil {
			conn.Close()
			return classify(err, true), "TLS handshake: " + err.Error()
		}
		conn = tc
	}
	c.conn, c.br = conn, bufio.NewReader(conn)
	return OK, ""
}

// send writes the request, on the connection in use unless the server
// closed it while idle (as a real client finds before reuse), else on a
// new one.
func (c *client) send(deadline time.Time) (Class, string) {
	if c.conn != nil && c.closedWhileIdle() {
		c.idleClosed++
		if c.cfg.OnIdleClosed != nil {
			c.cfg.OnIdleClosed(time.Now())
		}
		c.close()
	}
	if c.conn == nil {
		if class, detail := c.dial(deadline); class != OK {
			return class, detail
		}
	}
	c.conn.SetDeadline(deadline)
	connHdr := ""
	if c.cfg.Mode == NewConn {
		connHdr = "Connection: close\r\n"
	}
	req := fmt.Sprintf("POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n",
		c.cfg.Path, c.cfg.Addr, len(c.cfg.Body), connHdr)
	if _, err := c.conn.Write(append([]byte(req), c.cfg.Body...)); err != nil {
		return classify(err, false), "write: " + err.Error()
	}
	return OK, ""
}

// exchange sends one request and reads its response; headerAt is when the
// status line arrived.
func (c *client) exchange(deadline time.Time) (class Class, detail, gen string, headerAt time.Time, closeAfter bool) {
	if class, detail := c.send(deadline); class != OK {
		return class, detail, "", headerAt, false
	}
	if _, err := c.br.Peek(1); err != nil {
		// Not one byte of a response.
		if err == io.EOF && c.reused {
			return IdleRace, "read status line: " + err.Error(), "", headerAt, false
		}
		return classify(err, true), "read status line: " + err.Error(), "", headerAt, false
	}
	tp := textproto.NewReader(c.br)
	line, err := tp.ReadLine()
	if err != nil {
		return classify(err, true), "read status line: " + err.Error(), "", headerAt, false
	}
	headerAt = time.Now()
	proto, rest, _ := strings.Cut(line, " ")
	codeStr, _, _ := strings.Cut(rest, " ")
	code, cerr := strconv.Atoi(codeStr)
	if !strings.HasPrefix(proto, "HTTP/1.") || cerr != nil {
		return Malform, fmt.Sprintf("status line %q", line), "", headerAt, false
	}
	hdr, err := tp.ReadMIMEHeader()
	if err != nil {
		return classify(err, true), "read headers: " + err.Error(), "", headerAt, false
	}
	closeAfter = strings.EqualFold(hdr.Get("Connection"), "close") || proto == "HTTP/1.0"
	// The body of a 2xx response is checked as it streams by when a size
	// is expected; any other body is only read.
	var body io.Writer = io.Discard
	var check *patternCheck
	if c.cfg.ExpectSize > 0 && code >= 200 && code <= 299 {
		check = &patternCheck{}
		body = check
	}
	switch {
	case strings.EqualFold(hdr.Get("Transfer-Encoding"), "chunked"):
		err = readChunked(c.br, body)
	case hdr.Get("Content-Length") != "":
		n, perr := strconv.ParseInt(hdr.Get("Content-Length"), 10, 64)
		if perr != nil {
			return Malform, "Content-Length " + hdr.Get("Content-Length"), "", headerAt, false
		}
		_, err = io.CopyN(body, c.br, n)
	default:
		_, err = io.Copy(body, c.br)
		closeAfter = true
	}
	if err != nil {
		return classify(err, true), "read body: " + err.Error(), "", headerAt, false
	}
	if code < 200 || code > 299 {
		return Non2xx, line, "", headerAt, closeAfter
	}
	if check != nil {
		if msg := check.verdict(c.cfg.ExpectSize); msg != "" {
			// The response was whole as HTTP goes: the connection may
			// still be fine, but the class is a failure all the same.
			return Corrupt, fmt.Sprintf("generation %s: %s", hdr.Get("X-Generation"), msg), "", headerAt, closeAfter
		}
	}
	return OK, "", hdr.Get("X-Generation"), headerAt, closeAfter
}

// newH2Client returns a client whose Transport speaks HTTP/2 only: over
// TLS when cfg.TLS is set, else cleartext with prior knowledge. It dials
// cfg.Network and cfg.Addr whatever the URL says.
func newH2Client(cfg *Config) *http.Client {
	tr := &http.Transport{
		Protocols: new(http.Protocols),
		// Each Transport adjusts its own TLS config's NextProtos.
		TLSClientConfig:    cfg.TLS.Clone(),
		DisableCompression: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, cfg.Network, cfg.Addr)
		},
	}
	if cfg.TLS != nil {
		tr.Protocols.SetHTTP2(true)
	} else {
		tr.Protocols.SetUnencryptedHTTP2(true)
	}
	return &http.Client{Transport: tr}
}

// exchangeH2 is exchange for mode HTTP2: one POST through the client's
// Transport; headerAt is when its response header arrived.
func (c *client) exchangeH2(deadline time.Time) (class Class, detail, gen string, headerAt time.Time, closeAfter bool) {
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	scheme, host := "http", c.cfg.Addr
	if c.cfg.TLS != nil {
		scheme = "https"
	}
	if c.cfg.Network != "tcp" {
		host = "localhost"
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, scheme+"://"+host+c.cfg.Path, bytes.NewReader(c.cfg.Body))
	if err != nil {
		return Other, "request: " + err.Error(), "", headerAt, false
	}
	req.Header.Set("Content-Type", "text/plain")
	resp, err := c.h2.Do(req)
	if err != nil {
		return classify(err, true), "request: " + err.Error(), "", headerAt, false
	}
	defer resp.Body.Close()
	headerAt = time.Now()
	if resp.ProtoMajor != 2 {
		return Malform, "response over " + resp.Proto, "", headerAt, false
	}
	var body io.Writer = io.Discard
	var check *patternCheck
	if c.cfg.ExpectSize > 0 && resp.StatusCode >= 200 && resp.StatusCode <= 299 {
		check = &patternCheck{}
		body = check
	}
	if _, err := io.Copy(body, resp.Body); err != nil {
		return classify(err, true), "read body: " + err.Error(), "", headerAt, false
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return Non2xx, resp.Status, "", headerAt, false
	}
	if check != nil {
		if msg := check.verdict(c.cfg.ExpectSize); msg != "" {
			return Corrupt, fmt.Sprintf("generation %s: %s", resp.Header.Get("X-Generation"), msg), "", headerAt, false
		}
	}
	return OK, "", resp.Header.Get("X-Generation"), headerAt, false
}

// Pattern returns byte i of examples/hello's ?size= body: byte(i*7 +
// i>>10). It repeats every PatternPeriod bytes.
func Pattern(i int64) byte { return byte(i*7 + i>>10) }

// PatternPeriod is the pattern's period: i*7 mod 256 repeats every 256
// bytes and i>>10 mod 256 every 256 KiB.
const PatternPeriod = 256 << 10

// period is one period of the pattern, to compare bodies against a chunk
// at a time (bytes.Equal, not a loop per byte: a 50 MB body is checked in
// the race detector's test binaries too).
var period = func() []byte {
	b := make([]byte, PatternPeriod)
	for i := range b {
		b[i] = Pattern(int64(i))
	}
	return b
}()

// patternCheck is an io.Writer that compares what it is given with the
// pattern, keeping only the offset and the first mismatch.
type patternCheck struct {
	n       int64
	badAt   int64 // offset of the first differing byte, when bad
	bad     bool
	scratch []byte
}

func (p *patternCheck) Write(b []byte) (int, error) {
	for done := 0; done < len(b); {
		start := int(p.n % PatternPeriod)
		m := min(len(b)-done, PatternPeriod-start)
		if !p.bad && !bytes.Equal(b[done:done+m], period[start:start+m]) {
			for k := range m {
				if b[done+k] != period[start+k] {
					p.bad, p.badAt = true, p.n+int64(k)
					break
				}
			}
		}
		p.n += int64(m)
		done += m
	}
	return len(b), nil
}

// ReadFrom reads in 64 KiB pieces, so that a large body takes few reads
// (io.Copy would otherwise go through bufio's 4 KiB buffer).
func (p *patternCheck) ReadFrom(r io.Reader) (int64, error) {
	if p.scratch == nil {
		p.scratch = make([]byte, 64<<10)
	}
	var total int64
	for {
		n, err := r.Read(p.scratch)
		p.Write(p.scratch[:n])
		total += int64(n)
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// verdict describes how the body differs from want bytes of the pattern,
// or returns "" when it does not.
func (p *patternCheck) verdict(want int64) string {
	switch {
	case p.n != want:
		return fmt.Sprintf("body of %d bytes, want %d", p.n, want)
	case p.bad:
		return fmt.Sprintf("body differs from the pattern at byte %d", p.badAt)
	}
	return ""
}

func readChunked(br *bufio.Reader, body io.Writer) error {
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
		if _, err := io.CopyN(body, br, size); err != nil {
			return err
		}
		if crlf, err := tp.ReadLine(); err != nil || crlf != "" {
			return cmp.Or(err, fmt.Errorf("chunk of %d bytes not followed by CRLF", size))
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
