package drain

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/internal/slogrec"
)

// startServe runs Serve on a fresh loopback listener; stop cancels it and
// returns Serve's error.
func startServe(t testing.TB, srv *http.Server, opts Options) (d *Server, addr string, stop func() error) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	opts.NoReady = true
	d = New(srv, opts)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- d.Serve(ctx, []net.Listener{l}) }()
	var once sync.Once
	var serr error
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case serr = <-served:
			case <-time.After(30 * time.Second):
				t.Fatal("Serve did not return")
			}
		})
		return serr
	}
	t.Cleanup(func() { stop() })
	return d, l.Addr().String(), stop
}

// noKeepAlive's connections close after each response, so that none stays
// idle to hold up a drain until its deadline.
var noKeepAlive = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 30 * time.Second}

func panicky() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/panic" {
			panic("test panic")
		}
	})
}

// captureStderr swaps os.Stderr and the global log's output for the
// duration of f and returns what either received.
func captureStderr(t *testing.T, f func()) string {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	old := os.Stderr
	os.Stderr = w
	var logged bytes.Buffer
	log.SetOutput(&logged)
	defer log.SetOutput(old)
	f()
	os.Stderr = old
	w.Close()
	out, _ := io.ReadAll(r)
	return string(out) + logged.String()
}

// With no Logger, a caught panic is not printed anywhere: a library does
// not write to the process's stderr or the global log.
func TestCaughtPanicIsSilentWithoutLogger(t *testing.T) {
	out := captureStderr(t, func() {
		d, addr, stop := startServe(t, &http.Server{Handler: panicky()}, Options{Timeout: 5 * time.Second})
		resp, err := noKeepAlive.Get("http://" + addr + "/panic")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 500 {
			t.Fatalf("status %d, want 500", resp.StatusCode)
		}
		err = stop()
		if _, ok := err.(*FatalError); !ok {
			t.Fatalf("Serve: %v, want a *FatalError", err)
		}
		_ = d
	})
	if out != "" {
		t.Fatalf("drain printed with no Logger:\n%s", out)
	}
}

// With a Logger, the panic goes there, with its stack.
func TestCaughtPanicGoesToLogger(t *testing.T) {
	rec := slogrec.New()
	_, addr, stop := startServe(t, &http.Server{Handler: panicky()}, Options{Timeout: 5 * time.Second, Logger: rec.Logger()})
	resp, err := noKeepAlive.Get("http://" + addr + "/panic")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	stop()
	// One record, at ERROR, carrying the panic's value and the stack of
	// the handler that panicked.
	recs := rec.Records()
	if len(recs) != 1 {
		t.Fatalf("Logger got %d records, want the panic's: %+v", len(recs), recs)
	}
	r := recs[0]
	err, _ = r.Attrs["error"].Any().(error)
	if r.Level != slog.LevelError || err == nil || !strings.Contains(err.Error(), "test panic") ||
		!strings.Contains(r.Attrs["stack"].String(), "options_test.go") {
		t.Fatalf("Logger got %+v, want the panic at ERROR with its value and its stack", r)
	}
}

// NoRecover leaves a handler's panic to net/http: that connection closes,
// the worker goes on serving and does not drain.
func TestNoRecoverLeavesPanicsToNetHTTP(t *testing.T) {
	srv := &http.Server{Handler: panicky(), ErrorLog: log.New(io.Discard, "", 0)}
	d, addr, stop := startServe(t, srv, Options{Timeout: 5 * time.Second, NoRecover: true})
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write([]byte("GET /panic HTTP/1.1\r\nHost: x\r\n\r\n"))
	if resp, err := http.ReadResponse(bufio.NewReader(c), nil); err == nil {
		t.Fatalf("panicking handler answered %d: Recover is still in place", resp.StatusCode)
	}
	if d.Draining() {
		t.Fatal("a handler panic drained the worker despite NoRecover")
	}
	resp, err := noKeepAlive.Get("http://" + addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if err := stop(); err != nil {
		t.Fatalf("Serve: %v, want nil (no fatal error)", err)
	}
}

// When READY=1 cannot be sent, Serve returns its error having closed the
// listeners it was given and stopped serving on them: nothing goes on
// accepting connections behind the caller's back.
func TestServeStopsServingWhenReadyFails(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", filepath.Join(t.TempDir(), "nobody-listens"))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {})}
	err = Serve(context.Background(), srv, []net.Listener{l}, Options{})
	if err == nil {
		t.Fatal("Serve returned nil with an unreachable NOTIFY_SOCKET")
	}
	c, derr := net.Dial("tcp", addr)
	if derr == nil {
		c.Close()
		t.Fatalf("Serve returned %q but its listener still accepts", err)
	}
	// srv is closed too: serving it again fails at once.
	l2, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(l2); err != http.ErrServerClosed {
		t.Fatalf("srv.Serve after the failed Serve: %v, want http.ErrServerClosed", err)
	}
}
