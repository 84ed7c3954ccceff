package drain

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
	"golang.org/x/net/http2/hpack"
)

// One test per way a connection used to leave a drain wrong.

// Finding 1: the client sends its next request while the handler is still
// finishing the response; net/http's background read holds its first
// byte, so the connection cannot be taken. It must get "Connection: close"
// on that next response instead of being served here until the deadline.
func TestEarlyNextRequestGetsConnectionClose(t *testing.T) {
	u, h := newFakeUpgrader(t, func() bool { return true }, true)
	flushed := make(chan struct{}, 1)
	release := make(chan struct{})
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("X-From", "old")
		if r.URL.Path == "/tail" {
			w.Header().Set("Content-Length", "2")
			io.WriteString(w, "ok")
			http.NewResponseController(w).Flush()
			flushed <- struct{}{}
			<-release // the handler's "little more work"
		}
	})}
	d, addr, drain := startServe(t, srv, Options{Timeout: 20 * time.Second, Handoff: h})
	c, br := dialKeepAlive(t, addr)
	if _, err := io.WriteString(c, "POST /tail HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx"); err != nil {
		t.Fatal(err)
	}
	<-flushed
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	// The whole response is here, the handler has not returned: the
	// client sends its next request now, as a fast client does.
	if _, err := io.WriteString(c, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx"); err != nil {
		t.Fatal(err)
	}
	drained := make(chan error, 1)
	go func() { drained <- drain() }()
	waitFor(t, "the drain to begin", d.Draining)
	close(release)
	// Mostly net/http's background read has the next request's first
	// byte by now, and the old worker answers it. On a loaded machine it
	// may not have read it yet when the handler returns: then the
	// connection is idle, no byte of it read, and it is handed off with
	// the whole request still in the kernel for the taker. Either way no
	// byte is lost; what must never happen is neither.
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	answered := make(chan *http.Response, 1)
	go func() {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			resp = nil
		}
		answered <- resp
	}()
	select {
	case tc := <-u.taken:
		defer tc.Close()
		tc.SetReadDeadline(time.Now().Add(10 * time.Second))
		req, err := http.ReadRequest(bufio.NewReader(tc))
		if err != nil || req.Method != "POST" || req.URL.Path != "/" {
			t.Fatalf("handed off before net/http read a byte of the next request, which the taker must read whole: %v %+v", err, req)
		}
		if err := <-drained; err != nil {
			t.Fatal(err)
		}
		return
	case resp = <-answered:
	}
	if resp == nil {
		t.Fatal("the next request sent early was neither answered nor handed off")
	}
	resp.Body.Close()
	if resp.Header.Get("X-From") != "old" || !resp.Close {
		t.Fatalf("next request sent early: answered by %q with close=%v; want old, with Connection: close", resp.Header.Get("X-From"), resp.Close)
	}
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
	if n := d.HandedOff(); n != 0 || len(u.batches) != 0 {
		t.Fatalf("handed off %d (%d batches), want none: net/http held a byte of it", n, len(u.batches))
	}
}

// h2Client speaks HTTP/2 frames by hand (x/net's Framer), so that a test
// sees every frame the server sends, GOAWAY included.
type h2Client struct {
	t  *testing.T
	c  net.Conn
	fr *http2.Framer
}

func dialH2(t *testing.T, c net.Conn) *h2Client {
	t.Helper()
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(c, c)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	return &h2Client{t: t, c: c, fr: fr}
}

// request sends a POST on stream id and reads frames until its response
// ends; it fails on a GOAWAY.
func (h *h2Client) request(id uint32) {
	h.t.Helper()
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, f := range [][2]string{{":method", "POST"}, {":scheme", "http"}, {":authority", "x"}, {":path", "/"}} {
		enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	if err := h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true}); err != nil {
		h.t.Fatal(err)
	}
	if err := h.fr.WriteData(id, true, []byte("x")); err != nil {
		h.t.Fatal(err)
	}
	for {
		f, err := h.fr.ReadFrame()
		if err != nil {
			h.t.Fatalf("reading the response on stream %d: %v", id, err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				h.fr.WriteSettingsAck()
			}
		case *http2.GoAwayFrame:
			h.t.Fatalf("GOAWAY before the drain")
		}
		if f.Header().StreamID == id && f.Header().Flags.Has(http2.FlagDataEndStream) {
			return
		}
	}
}

// goAway reads frames until the server's GOAWAY.
func (h *h2Client) goAway() *http2.GoAwayFrame {
	h.t.Helper()
	for {
		f, err := h.fr.ReadFrame()
		if err != nil {
			h.t.Fatalf("no GOAWAY before %v", err)
		}
		if g, ok := f.(*http2.GoAwayFrame); ok {
			return g
		}
	}
}

// Finding 2: net/http's own h2c is HTTP/2, never taken for HTTP/1.1, not
// even while its frame reader asks for a 4096-byte payload; and finding 5:
// an idle HTTP/2 connection is told GOAWAY when the drain begins.
func TestH2CIsNeverTakenAndGetsGoAway(t *testing.T) {
	u, h := newFakeUpgrader(t, func() bool { return true }, true)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
	})}
	srv.Protocols = new(http.Protocols)
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetUnencryptedHTTP2(true)
	d, addr, drain := startServe(t, srv, Options{Timeout: 20 * time.Second, Handoff: h})
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	h2 := dialH2(t, c)
	h2.request(1)
	// The 9-byte header of a HEADERS frame with a 4096-byte block, and no
	// more: the server's frame reader now asks for 4096 bytes.
	if _, err := c.Write([]byte{0, 0x10, 0, byte(http2.FrameHeaders), 0, 0, 0, 0, 3}); err != nil {
		t.Fatal(err)
	}
	drained := make(chan error, 1)
	go func() { drained <- drain() }()
	g := h2.goAway()
	if g.ErrCode != http2.ErrCodeNo {
		t.Fatalf("GOAWAY %v, want NO_ERROR (graceful)", g.ErrCode)
	}
	c.Close()
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
	if n := d.HandedOff(); n != 0 || len(u.batches) != 0 {
		t.Fatalf("an HTTP/2 connection was handed off %d times (%d batches)", n, len(u.batches))
	}
}

// Finding 5: an idle HTTP/2 connection over TLS gets GOAWAY when the drain
// begins.
func TestIdleH2OverTLSGetsGoAway(t *testing.T) {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {})}
	l := tlsListener(t, "h2", "http/1.1")
	_, drain := serveOn(t, srv, l, Options{Timeout: 20 * time.Second})
	c := dialTLS(t, l.Addr().String(), "h2")
	h2 := dialH2(t, c)
	h2.request(1)
	drained := make(chan error, 1)
	go func() { drained <- drain() }()
	if g := h2.goAway(); g.ErrCode != http2.ErrCodeNo {
		t.Fatalf("GOAWAY %v, want NO_ERROR", g.ErrCode)
	}
	c.Close()
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
}

// Finding 3: golang.org/x/net/http2/h2c's handler serves HTTP/2 streams
// the drain never sees; Serve refuses it, naming the fix, and closes its
// listeners.
func TestXNetH2CIsRefused(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h2c.NewHandler(http.NotFoundHandler(), &http2.Server{})}
	served := make(chan error, 1)
	go func() { served <- Serve(context.Background(), srv, []net.Listener{l}, Options{NoReady: true}) }()
	select {
	case err := <-served:
		if !errors.Is(err, errXNetH2C) || !strings.Contains(err.Error(), "SetUnencryptedHTTP2") {
			t.Fatalf("Serve: %v, want the h2c refusal naming the fix", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("Serve served x/net's h2c handler instead of refusing it")
	}
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("listener after the refusal: %v, want closed", err)
	}
}

// Finding 4: a hijacked connection (a WebSocket, say) is the
// application's: the drain tells it the drain began, and waits for it.
func TestHijackedSessionIsWaitedFor(t *testing.T) {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, rw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		defer c.Close()
		rw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
		rw.Flush()
		lines := make(chan string)
		go func() {
			defer close(lines)
			for {
				s, err := rw.ReadString('\n')
				if err != nil {
					return
				}
				lines <- s
			}
		}()
		started := Started(r.Context())
		for {
			select {
			case <-started:
				started = nil
				rw.WriteString("draining\n")
				rw.Flush()
			case s, ok := <-lines:
				if !ok || s == "bye\n" {
					return
				}
				rw.WriteString(s)
				rw.Flush()
			}
		}
	})}
	d, addr, drain := startServe(t, srv, Options{Timeout: 20 * time.Second})
	c, br := dialKeepAlive(t, addr)
	c.SetDeadline(time.Now().Add(15 * time.Second))
	io.WriteString(c, "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 101 {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	drained := make(chan error, 1)
	go func() { drained <- drain() }()
	if s, err := br.ReadString('\n'); s != "draining\n" {
		t.Fatalf("session got %q, %v; want the drain's news", s, err)
	}
	// The session goes on during the drain, and holds it open.
	io.WriteString(c, "ping\n")
	if s, err := br.ReadString('\n'); s != "ping\n" {
		t.Fatalf("echo during the drain: %q, %v", s, err)
	}
	select {
	case err := <-drained:
		t.Fatalf("Serve returned (%v) with a hijacked session open", err)
	default:
	}
	if !d.Draining() {
		t.Fatal("not draining")
	}
	io.WriteString(c, "bye\n")
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
}

// ... and closes it at the deadline if the application does not.
func TestHijackedSessionClosedAtDeadline(t *testing.T) {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, rw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		rw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n")
		rw.Flush()
		io.Copy(io.Discard, c) // never closes it itself
	})}
	_, addr, drain := startServe(t, srv, Options{Timeout: 300 * time.Millisecond})
	c, br := dialKeepAlive(t, addr)
	c.SetDeadline(time.Now().Add(15 * time.Second))
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n")
	if resp, err := http.ReadResponse(br, nil); err != nil || resp.StatusCode != 101 {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	if err := drain(); err != nil {
		t.Fatal(err)
	}
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("session after the deadline: %v, want EOF", err)
	}
}

// Finding 5: an idle TLS HTTP/1.1 connection cannot be handed off and
// writes no response to say Connection: close on; it is closed (with
// close_notify) once idle for IdleGrace, long before the deadline. One
// whose client sends within the grace is answered, with Connection: close.
func TestIdleTLSConnectionClosedAfterGrace(t *testing.T) {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
	})}
	l := tlsListener(t, "http/1.1")
	d, drain := serveOn(t, srv, l, Options{Timeout: 60 * time.Second, IdleGrace: 500 * time.Millisecond})
	idle := dialTLS(t, l.Addr().String(), "http/1.1")
	ibr := bufio.NewReader(idle)
	rawRequest(t, idle, ibr, "/")
	busy := dialTLS(t, l.Addr().String(), "http/1.1")
	bbr := bufio.NewReader(busy)
	rawRequest(t, busy, bbr, "/")

	drained := make(chan error, 1)
	go func() { drained <- drain() }()
	waitFor(t, "the drain to begin", d.Draining)
	// Sent within the grace (the idle one is closed only the grace later).
	if resp := rawRequest(t, busy, bbr, "/"); !resp.Close {
		t.Fatal("request during the drain: no Connection: close")
	}
	idle.SetReadDeadline(time.Now().Add(30 * time.Second)) // half the deadline
	if _, err := ibr.ReadByte(); err != io.EOF {
		t.Fatalf("idle TLS connection: %v, want closed by close_notify (EOF)", err)
	}
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
}

// A second drain signal closes what is idle at once (upgrader sends it to
// the oldest generation when too many drain).
func TestSecondSignalClosesIdleConnections(t *testing.T) {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
	})}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d := New(srv, Options{Timeout: 60 * time.Second, IdleGrace: -1, NoReady: true, Signals: []os.Signal{syscall.SIGUSR2}})
	served := make(chan error, 1)
	go func() { served <- d.Serve(context.Background(), []net.Listener{l}) }()
	c, br := dialKeepAlive(t, l.Addr().String())
	rawRequest(t, c, br, "/")
	syscall.Kill(os.Getpid(), syscall.SIGUSR2)
	<-d.Started()
	syscall.Kill(os.Getpid(), syscall.SIGUSR2)
	<-d.Hurried() // the application hears of it too
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("idle connection after a second signal: %v, want EOF", err)
	}
	if err := <-served; err != nil {
		t.Fatal(err)
	}
}

// serveOn runs Serve on l; stop cancels it and returns Serve's error.
func serveOn(t *testing.T, srv *http.Server, l net.Listener, opts Options) (*Server, func() error) {
	t.Helper()
	opts.NoReady = true
	d := New(srv, opts)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- d.Serve(ctx, []net.Listener{l}) }()
	t.Cleanup(cancel)
	return d, func() error {
		cancel()
		select {
		case err := <-served:
			return err
		case <-time.After(30 * time.Second):
			return errors.New("Serve did not return")
		}
	}
}

// tlsListener is a loopback TLS listener with a fresh self-signed
// certificate, offering protos by ALPN.
func tlsListener(t *testing.T, protos ...string) net.Listener {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return tls.NewListener(l, &tls.Config{NextProtos: protos,
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}})
}

func dialTLS(t *testing.T, addr, proto string) net.Conn {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{proto}})
	if err != nil {
		t.Fatal(err)
	}
	if got := c.ConnectionState().NegotiatedProtocol; got != proto {
		t.Fatalf("ALPN: %q, want %q", got, proto)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
