package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
)

// startEcho serves echo in-process on a fresh loopback port, with no
// handoff channel (as standalone), and returns its address, the cancel
// that begins its drain, and serve's result.
func startEcho(t *testing.T, drainTimeout time.Duration) (addr string, drainNow context.CancelFunc, served <-chan error) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e := newEcho(7, slog.New(slog.DiscardHandler), nil, drainTimeout)
	ctx, cancel := context.WithCancel(context.Background())
	done, finished := make(chan error, 1), make(chan struct{})
	go func() {
		defer close(finished)
		done <- e.serve(ctx, []net.Listener{l})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-finished:
		case <-time.After(2 * drainTimeout):
			t.Error("serve did not return after its drain deadline")
		}
	})
	return l.Addr().String(), cancel, done
}

func dial(t *testing.T, addr string) (net.Conn, io.ReadWriter) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, br, _, err := ws.Dial(ctx, "ws://"+addr+"/ws")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	var r io.Reader = conn
	if br != nil {
		r = br
	}
	return conn, struct {
		io.Reader
		io.Writer
	}{r, conn}
}

func exchange(t *testing.T, conn net.Conn, rw io.ReadWriter, msg string) {
	t.Helper()
	if err := wsutil.WriteClientText(conn, []byte(msg)); err != nil {
		t.Fatal(err)
	}
	got, err := wsutil.ReadServerText(rw)
	if err != nil || string(got) != "7 "+msg {
		t.Fatalf("reply %q, %v; want %q", got, err, "7 "+msg)
	}
}

// With no new generation to take it, a session goes on through the drain,
// which waits for it, and is closed politely (1001) before the deadline.
func TestSessionClosedPolitelyWithoutHandoff(t *testing.T) {
	addr, drainNow, served := startEcho(t, 2*time.Second)
	conn, rw := dial(t, addr)
	exchange(t, conn, rw, "before the drain")
	drainNow()
	exchange(t, conn, rw, "during the drain")
	select {
	case err := <-served:
		t.Fatalf("the drain ended (%v) with a session open", err)
	default:
	}
	// The server's close frame comes before the drain's deadline.
	h, err := ws.ReadHeader(rw)
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, h.Length)
	if _, err := io.ReadFull(rw, p); err != nil {
		t.Fatal(err)
	}
	if h.OpCode != ws.OpClose || len(p) < 2 || ws.StatusCode(binary.BigEndian.Uint16(p)) != ws.StatusGoingAway {
		t.Fatalf("got frame %v %q; want a close frame 1001 (going away)", h.OpCode, p)
	}
	// Our answer ends the session, and with it the drain.
	if err := wsutil.WriteClientMessage(conn, ws.OpClose, p[:2]); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("after the closing handshake: %v, want EOF", err)
	}
	if err := <-served; err != nil {
		t.Fatal(err)
	}
}

// A session the client ends during the drain ends the drain.
func TestClientEndsSessionDuringDrain(t *testing.T) {
	addr, drainNow, served := startEcho(t, time.Minute)
	conn, rw := dial(t, addr)
	exchange(t, conn, rw, "hello")
	drainNow()
	if err := wsutil.WriteClientMessage(conn, ws.OpClose, ws.NewCloseFrameBody(ws.StatusNormalClosure, "")); err != nil {
		t.Fatal(err)
	}
	h, err := ws.ReadHeader(rw)
	if err != nil || h.OpCode != ws.OpClose {
		t.Fatalf("answer to our close: %v %v, want a close frame", h.OpCode, err)
	}
	select {
	case err := <-served:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the drain did not end with its last session")
	}
}

// Pings are answered, fragmented messages are put together, GET / says
// what the server is.
func TestProtocol(t *testing.T) {
	addr, _, _ := startEcho(t, time.Second)
	conn, rw := dial(t, addr)
	if err := wsutil.WriteClientMessage(conn, ws.OpPing, []byte("p")); err != nil {
		t.Fatal(err)
	}
	f, err := ws.ReadFrame(rw)
	if err != nil || f.Header.OpCode != ws.OpPong || string(f.Payload) != "p" {
		t.Fatalf("answer to ping: %v %q %v", f.Header.OpCode, f.Payload, err)
	}
	for _, fr := range []ws.Frame{ws.NewFrame(ws.OpText, false, []byte("frag")), ws.NewFrame(ws.OpContinuation, true, []byte("mented"))} {
		if err := ws.WriteFrame(conn, ws.MaskFrame(fr)); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := wsutil.ReadServerText(rw); err != nil || string(got) != "7 fragmented" {
		t.Fatalf("reply %q, %v; want \"7 fragmented\"", got, err)
	}
	exchange(t, conn, rw, "héllo, wörld")

	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<10))
	if resp.StatusCode != 200 || !strings.Contains(string(body), "WebSocket echo") || !strings.Contains(string(body), "generation 7") {
		t.Fatalf("GET /: %d %q", resp.StatusCode, body)
	}
}
