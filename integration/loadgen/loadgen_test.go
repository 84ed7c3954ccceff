package loadgen

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// body returns n bytes of the pattern, as examples/hello's ?size=n sends.
func body(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = Pattern(int64(i))
	}
	return b
}

func TestPatternCheck(t *testing.T) {
	const n = 3*PatternPeriod + 12345
	good := body(n)
	// Written in uneven pieces that straddle the period's end.
	check := func(b []byte) string {
		var p patternCheck
		for off := 0; off < len(b); {
			m := min(len(b)-off, 1+off%70001)
			p.Write(b[off : off+m])
			off += m
		}
		return p.verdict(n)
	}
	if v := check(good); v != "" {
		t.Fatalf("the pattern itself: %s", v)
	}
	flipped := append([]byte(nil), good...)
	flipped[PatternPeriod+7] ^= 1
	if v := check(flipped); !strings.Contains(v, "at byte "+strconv.Itoa(PatternPeriod+7)) {
		t.Errorf("a flipped byte: verdict %q", v)
	}
	// A body that lost 256 bytes in the middle, padded back to length:
	// byte(i*7) alone would not see it, i>>10 does.
	shifted := append(append([]byte(nil), good[:5000]...), good[5256:]...)
	shifted = append(shifted, good[:256]...)
	if v := check(shifted); v == "" {
		t.Error("a shift by 256 bytes went unseen")
	}
	if v := check(good[:n-1]); !strings.Contains(v, "body of") {
		t.Errorf("a short body: verdict %q", v)
	}
}

// serve starts a test server answering size bytes of the pattern (with
// one byte changed when corrupt), telling the protocol it saw in
// X-Generation so that the client's view can be compared with it.
func serve(t *testing.T, size int, corrupt bool, start func(*httptest.Server)) *httptest.Server {
	t.Helper()
	b := body(size)
	if corrupt {
		b[size/2] ^= 0x80
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Generation", strconv.Itoa(r.ProtoMajor))
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		w.Write(b)
	}))
	start(srv)
	t.Cleanup(srv.Close)
	return srv
}

func TestExpectSizeOnResponseAndProtocols(t *testing.T) {
	const size = PatternPeriod + 999
	h2c := func(s *httptest.Server) {
		s.Config.Protocols = new(http.Protocols)
		s.Config.Protocols.SetHTTP1(true)
		s.Config.Protocols.SetUnencryptedHTTP2(true)
		s.Start()
	}
	tlsH2 := func(s *httptest.Server) {
		s.EnableHTTP2 = true
		s.StartTLS()
	}
	for _, tc := range []struct {
		name    string
		start   func(*httptest.Server)
		mode    Mode
		tls     bool
		corrupt bool
		want    Class
		proto   string // what the server saw, through X-Generation
	}{
		{"http1", (*httptest.Server).Start, KeepAlive, false, false, OK, "1"},
		{"http1 corrupt", (*httptest.Server).Start, KeepAlive, false, true, Corrupt, ""},
		// The server offers h2 too: Config.TLS still means HTTP/1.1.
		{"tls http1", tlsH2, KeepAlive, true, false, OK, "1"},
		{"tls h2", tlsH2, HTTP2, true, false, OK, "2"},
		{"h2c", h2c, HTTP2, false, false, OK, "2"},
		{"h2c corrupt", h2c, HTTP2, false, true, Corrupt, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := serve(t, size, tc.corrupt, tc.start)
			cfg := Config{Addr: strings.TrimPrefix(strings.TrimPrefix(srv.URL, "http://"), "https://"),
				Clients: 2, Requests: 3, Mode: tc.mode, ExpectSize: size, Timeout: 30 * time.Second}
			if tc.tls {
				cfg.TLS = &tls.Config{InsecureSkipVerify: true}
			}
			var mu sync.Mutex
			var seen []time.Time
			before := time.Now()
			cfg.OnResponse = func(gen string, at time.Time) {
				mu.Lock()
				defer mu.Unlock()
				if gen != tc.proto {
					t.Errorf("OnResponse with generation %q, want %q", gen, tc.proto)
				}
				seen = append(seen, at)
			}
			r := Run(context.Background(), cfg)
			if r.Requests != 6 || r.Counts[tc.want] != 6 {
				t.Fatalf("%s; want 6 requests, all %s", r, tc.want)
			}
			if tc.want != OK {
				if len(seen) != 0 {
					t.Errorf("OnResponse called %d times for failed requests", len(seen))
				}
				return
			}
			if len(seen) != 6 {
				t.Fatalf("OnResponse called %d times for 6 OK responses", len(seen))
			}
			for _, at := range seen {
				if at.Before(before) || at.After(time.Now()) {
					t.Errorf("header time %s outside the run (%s on)", at, before)
				}
			}
		})
	}
}

// TestOnOutcomeAndOnIdleClosed runs keep-alive clients against a server
// that closes every connection right after its response, without saying
// so, and answers every third request 500: the hooks must see every
// outcome and every idle close that the Result counts, at times within the
// run.
func TestOnOutcomeAndOnIdleClosed(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var served atomic.Int64
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				req, err := http.ReadRequest(bufio.NewReader(conn))
				if err != nil {
					return
				}
				io.Copy(io.Discard, req.Body)
				status := "200 OK"
				if served.Add(1)%3 == 0 {
					status = "500 Internal Server Error"
				}
				fmt.Fprintf(conn, "HTTP/1.1 %s\r\nContent-Length: 2\r\n\r\nok", status)
			}()
		}
	}()

	var mu sync.Mutex
	outcomes := map[Class]int{}
	var idle int
	var times []time.Time
	var lats []time.Duration
	before := time.Now()
	r := Run(context.Background(), Config{
		Addr: ln.Addr().String(), Clients: 2, Requests: 6, Mode: KeepAlive,
		MaxIdle: 20 * time.Millisecond, Timeout: 5 * time.Second,
		OnOutcome: func(c Class, at time.Time) {
			mu.Lock()
			defer mu.Unlock()
			outcomes[c]++
			times = append(times, at)
		},
		OnIdleClosed: func(at time.Time) {
			mu.Lock()
			defer mu.Unlock()
			idle++
			times = append(times, at)
		},
		OnLatency: func(sent time.Time, took time.Duration) {
			mu.Lock()
			defer mu.Unlock()
			lats = append(lats, took)
			times = append(times, sent, sent.Add(took))
		},
	})
	after := time.Now()
	if len(lats) != r.Counts[OK] {
		t.Errorf("OnLatency called %d times, %d OK", len(lats), r.Counts[OK])
	}
	var max time.Duration
	for _, d := range lats {
		max = maxDur(max, d)
	}
	if max != r.Max {
		t.Errorf("OnLatency's largest %s, Result.Max %s", max, r.Max)
	}
	if r.Requests != 12 {
		t.Fatalf("%s; want 12 requests", r)
	}
	for _, c := range Classes {
		if outcomes[c] != r.Counts[c] {
			t.Errorf("OnOutcome saw %d %s, Result counts %d", outcomes[c], c, r.Counts[c])
		}
	}
	if r.Counts[Non2xx] == 0 {
		t.Errorf("%s; want some non2xx (every third answer is 500)", r)
	}
	if idle != r.IdleClosed || idle == 0 {
		t.Errorf("OnIdleClosed called %d times, Result.IdleClosed %d; want equal and above 0", idle, r.IdleClosed)
	}
	for _, at := range times {
		if at.Before(before) || at.After(after) {
			t.Errorf("hook time %s outside the run (%s to %s)", at, before, after)
		}
	}
}

// TestIdleRaceClass runs one keep-alive client against a server that
// answers a connection's first request, reads the second whole, and then
// ends the connection one way or another. Only an orderly end (FIN, or
// TLS close_notify) with not one byte of a response is an IdleRace, the
// race of a server closing an idle connection as its client sends; a
// reset, a partial response, or the first request of a connection are
// failures of their own class.
func TestIdleRaceClass(t *testing.T) {
	reset := func(c net.Conn) {
		c.(*net.TCPConn).SetLinger(0) // close(2) sends RST
		c.Close()
	}
	for _, tc := range []struct {
		name  string
		tls   bool
		first bool // end the connection at its first request
		end   func(c net.Conn)
		want  Class
	}{
		{"FIN", false, false, func(c net.Conn) { c.Close() }, IdleRace},
		{"close_notify", true, false, func(c net.Conn) { c.Close() }, IdleRace},
		{"reset", false, false, reset, Reset},
		{"partial status line", false, false, func(c net.Conn) {
			io.WriteString(c, "HTTP/1.1 2")
			c.Close()
		}, EOF},
		{"partial body", false, false, func(c net.Conn) {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
			c.Close()
		}, EOF},
		{"reset after response bytes", false, false, func(c net.Conn) {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
			reset(c)
		}, Reset},
		{"first request", false, true, func(c net.Conn) { c.Close() }, EOF},
		{"first request, close_notify", true, true, func(c net.Conn) { c.Close() }, EOF},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ln.Close() })
			var srvTLS *tls.Config
			if tc.tls {
				srvTLS = selfSigned(t)
			}
			go func() {
				raw, err := ln.Accept()
				if err != nil {
					return
				}
				conn := raw
				if srvTLS != nil {
					conn = tls.Server(raw, srvTLS)
				}
				defer conn.Close()
				br := bufio.NewReader(conn)
				for n := 1; ; n++ {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					io.Copy(io.Discard, req.Body)
					if n == 2 || tc.first {
						if srvTLS != nil {
							tc.end(conn)
						} else {
							tc.end(raw)
						}
						return
					}
					io.WriteString(conn, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
				}
			}()
			cfg := Config{Addr: ln.Addr().String(), Clients: 1, Requests: 2, Mode: KeepAlive, Timeout: 10 * time.Second}
			if tc.first {
				cfg.Requests = 1
			}
			if tc.tls {
				cfg.TLS = &tls.Config{InsecureSkipVerify: true}
			}
			r := Run(context.Background(), cfg)
			if r.Counts[tc.want] != 1 || r.Counts[OK] != cfg.Requests-1 || r.Requests != cfg.Requests {
				t.Fatalf("%s; want the last request %s", r, tc.want)
			}
			if r.Failed() != 1 {
				t.Fatalf("Failed() = %d, want 1: %s", r.Failed(), r)
			}
		})
	}
}

// selfSigned is a TLS server configuration with a fresh self-signed
// certificate for 127.0.0.1.
func selfSigned(t *testing.T) *tls.Config {
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
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}
}

func maxDur(a, b time.Duration) time.Duration {
	if a > b {
		return a
	}
	return b
}
