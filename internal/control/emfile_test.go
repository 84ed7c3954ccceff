package control

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/sys/unix"
)

// acceptWatcher passes Accept through and reports its errors, so that the
// test waits for the accept failure it provokes instead of guessing a time.
type acceptWatcher struct {
	net.Listener
	failed chan error
}

func (w acceptWatcher) Accept() (net.Conn, error) {
	c, err := w.Listener.Accept()
	if err != nil {
		select {
		case w.failed <- err:
		default:
		}
	}
	return c, err
}

const emfileChild = "UPGRADER_CONTROL_TEST_EMFILE_CHILD"

// TestServeSurvivesEMFILE runs out of fds for real: RLIMIT_NOFILE is
// process-wide, so the test re-runs itself in a child process whose limit it
// lowers, and leaves the other tests alone.
func TestServeSurvivesEMFILE(t *testing.T) {
	if os.Getenv(emfileChild) == "" {
		cmd := exec.Command(os.Args[0], "-test.run=^TestServeSurvivesEMFILE$", "-test.v")
		cmd.Env = append(os.Environ(), emfileChild+"=1")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("child test: %v\n%s", err, out)
		}
		t.Logf("child test:\n%s", out)
		return
	}

	path := filepath.Join(t.TempDir(), "c.sock")
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	w := acceptWatcher{Listener: l, failed: make(chan error, 1)}
	// Connections wait in the backlog, each holding one fd on the client
	// side, before the limit leaves no fd for Accept.
	var clients []net.Conn
	for range 32 {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
	}
	probe, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	next := probe.Fd() // the lowest free fd number
	probe.Close()
	var orig unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &orig); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: uint64(next), Max: orig.Max}); err != nil {
		t.Fatal(err)
	}

	core, logs := observer.New(zap.WarnLevel)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan struct{})
	go func() {
		defer close(served)
		Serve(ctx, w, func(ctx context.Context, r Request, send func(any) error) error {
			return send(map[string]string{"state": "fine"})
		}, zap.New(core))
	}()
	select {
	case err := <-w.failed:
		if !errors.Is(err, syscall.EMFILE) {
			t.Fatalf("accept failed with %v, want EMFILE", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("accept never ran out of fds")
	}
	// The burst is over: its fds come free, and the supervisor must answer.
	for _, c := range clients {
		c.Close()
	}
	dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
	defer dcancel()
	var got []byte
	if err := Do(dctx, path, Request{Command: "status"}, func(b []byte) error {
		got = append(got, b...)
		return nil
	}); err != nil {
		t.Fatalf("status after the fd table was full: %v", err)
	}
	if string(got) != `{"state":"fine"}` {
		t.Fatalf("status after the fd table was full: %q", got)
	}
	var logged bool
	for _, e := range logs.All() {
		if err, ok := e.ContextMap()["error"].(string); ok && err != "" && e.Level == zap.WarnLevel {
			logged = true
		}
	}
	if !logged {
		t.Fatalf("the accept error was not logged: %+v", logs.All())
	}
	cancel()
	<-served
}
