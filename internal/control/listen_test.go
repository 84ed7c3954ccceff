package control

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap/zaptest"

	"github.com/seed6cb0314a/upgrader/internal/sockets"
)

// A second upgrader given the same control socket refuses, and says whose it
// is and how to run a second one; the first keeps its socket.
func TestListenRefusesALiveUpgrader(t *testing.T) {
	path := filepath.Join(t.TempDir(), "upgrader.sock")
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() {
		defer close(served)
		Serve(ctx, l, func(ctx context.Context, r Request, send func(any) error) error {
			return send(map[string]int{"pid": 4242})
		}, zaptest.NewLogger(t))
	}()
	defer func() { cancel(); <-served }()

	_, err = Listen(path)
	if err == nil {
		t.Fatal("a second Listen took a live control socket over")
	}
	for _, want := range []string{"--control " + path, "another upgrader (pid 4242)", "--control PATH", "--control none"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if !errors.Is(err, sockets.ErrInUse) {
		t.Errorf("error %q does not wrap sockets.ErrInUse", err)
	}
	if err := Do(ctx, path, Request{Command: "status"}, func([]byte) error { return nil }); err != nil {
		t.Fatalf("the first upgrader lost its control socket: %v", err)
	}
}

// A control socket whose upgrader was SIGKILLed (the file stays, nothing
// listens) is replaced.
func TestListenReplacesAStaleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "upgrader.sock")
	old, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	old.(*net.UnixListener).SetUnlinkOnClose(false) // as a killed process leaves it
	old.Close()
	l, err := Listen(path)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	l.Close()
}
