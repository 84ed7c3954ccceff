package drain

import (
	"bufio"
	"context"
	"net"
	"net/http"
	"testing"
	"time"
)

func rawRequest(t *testing.T, c net.Conn, br *bufio.Reader, target string) *http.Response {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("POST " + target + " HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("request %s: %v", target, err)
	}
	resp.Body.Close()
	return resp
}

func TestDrainAnswersIdleConnectionsWithConnectionClose(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	started := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {})
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		close(started)
		<-release
	})
	srv := &http.Server{Handler: mux}
	ctx, cancel := context.WithCancel(context.Background())
	drained := make(chan struct{})
	served := make(chan error, 1)
	go func() {
		served <- Serve(ctx, srv, []net.Listener{l}, Options{Timeout: 10 * time.Second, NoReady: true, OnDrain: func() { close(drained) }})
	}()

	idle, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	ibr := bufio.NewReader(idle)
	if resp := rawRequest(t, idle, ibr, "/"); resp.Close {
		t.Fatal("keep-alive response says close before the drain")
	}
	busy, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	bbr := bufio.NewReader(busy)
	slow := make(chan *http.Response, 1)
	go func() { slow <- rawRequest(t, busy, bbr, "/slow") }()
	select {
	case <-started: // the request is in flight
	case <-time.After(10 * time.Second):
		t.Fatal("the slow request's handler did not start")
	}

	cancel() // the drain signal
	<-drained
	// The idle connection was not closed under us: the next request is
	// answered, with Connection: close.
	if resp := rawRequest(t, idle, ibr, "/"); resp.StatusCode != 200 || !resp.Close {
		t.Fatalf("request on an idle connection during drain: %d, close=%v", resp.StatusCode, resp.Close)
	}
	// New connections are no longer accepted by this server: the drain
	// closes the listener right after OnDrain.
	for deadline := time.Now().Add(5 * time.Second); ; {
		c, err := net.DialTimeout("tcp", l.Addr().String(), time.Second)
		if err != nil {
			break
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatal("listener still accepts 5s after the drain began")
		}
		time.Sleep(time.Millisecond) // polling interval
	}
	// A negative check over a fixed short window: Serve does not return
	// while a request is in flight.
	select {
	case err := <-served:
		t.Fatalf("Serve returned (%v) with a request in flight", err)
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	if resp := <-slow; resp.StatusCode != 200 || !resp.Close {
		t.Fatalf("in-flight request: %d, close=%v", resp.StatusCode, resp.Close)
	}
	select {
	case err := <-served:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return once every connection was closed")
	}
}

func TestDrainDeadlineClosesIdleConnections(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {})}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() {
		served <- Serve(ctx, srv, []net.Listener{l}, Options{Timeout: 300 * time.Millisecond, NoReady: true})
	}()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	rawRequest(t, c, br, "/")
	start := time.Now()
	cancel()
	if err := <-served; err != nil {
		t.Fatal(err)
	}
	// Closed at the deadline, not before.
	if _, err := br.ReadByte(); err == nil {
		t.Fatal("connection still open after the drain")
	}
	if el := time.Since(start); el < 250*time.Millisecond {
		t.Fatalf("idle connection closed after %s, before the 300ms deadline", el)
	}
}
