package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/internal/control"
)

// runStop runs `upgrader stop ARGS` and returns its exit status and stderr.
func runStop(t *testing.T, upgrader string, args ...string) (int, string) {
	t.Helper()
	cmd := exec.Command(upgrader, append([]string{"stop"}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		return ee.ExitCode(), stderr.String()
	case err != nil:
		t.Fatalf("upgrader stop %q: %v", args, err)
	}
	return 0, stderr.String()
}

// exited tells whether process pid, a child of this test, has exited: it
// is gone, or a zombie waiting for cmd.Wait.
func exited(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// The state follows the command name, which is in parentheses.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && (s[i+2] == 'Z' || s[i+2] == 'X')
}

// `upgrader stop` returns once the upgrader has exited, not once it has
// answered; with no upgrader (no socket file, or one a killed upgrader
// left) it succeeds at once, for systemd runs ExecStop= after a crash too.
func TestStopCommand(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: this test builds and runs the binaries")
	}
	dir := t.TempDir()
	upgrader, hello := build(t, dir)
	runtime := filepath.Join(dir, "run")
	if err := os.Mkdir(runtime, 0o700); err != nil {
		t.Fatal(err)
	}

	t.Run("no socket file", func(t *testing.T) {
		code, stderr := runStop(t, upgrader, "--control", filepath.Join(runtime, "absent.sock"))
		if code != 0 {
			t.Fatalf("exit %d, want 0; stderr:\n%s", code, stderr)
		}
		mustContain(t, "stderr", stderr, "nothing to stop", "absent.sock")
	})
	t.Run("stale socket file", func(t *testing.T) {
		path := filepath.Join(runtime, "stale.sock")
		l, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		l.(*net.UnixListener).SetUnlinkOnClose(false)
		l.Close()
		code, stderr := runStop(t, upgrader, "--control", path)
		if code != 0 {
			t.Fatalf("exit %d, want 0; stderr:\n%s", code, stderr)
		}
		mustContain(t, "stderr", stderr, "nothing to stop", "stale.sock")
	})
	t.Run("graceful", func(t *testing.T) {
		sock := filepath.Join(runtime, "a.sock")
		a := start(t, runtime, upgrader, "--listen", "127.0.0.1:0", "--control", sock, "--", hello)
		waitServing(t, a, sock)
		code, stderr := runStop(t, upgrader, "--control", sock)
		if code != 0 {
			t.Fatalf("exit %d, want 0; stderr:\n%s", code, stderr)
		}
		if !exited(a.cmd.Process.Pid) {
			t.Fatalf("upgrader stop returned with upgrader pid %d still running; stderr:\n%s", a.cmd.Process.Pid, stderr)
		}
		mustContain(t, "stderr", stderr, fmt.Sprintf("upgrader pid %d has exited", a.cmd.Process.Pid))
		if code := a.wait(t); code != 0 {
			t.Fatalf("upgrader exited %d after the stop; stderr:\n%s", code, a.stderr)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		sock := filepath.Join(runtime, "b.sock")
		b := start(t, runtime, upgrader, "--listen", "127.0.0.1:0", "--control", sock, "--shutdown-delay", "1m", "--", hello)
		waitServing(t, b, sock)
		code, stderr := runStop(t, upgrader, "--control", sock, "--timeout", "300ms")
		if code != 1 {
			t.Fatalf("exit %d, want 1; stderr:\n%s", code, stderr)
		}
		mustContain(t, "stderr", stderr, fmt.Sprintf("upgrader pid %d still running after --timeout 300ms", b.cmd.Process.Pid))
		// The stop has begun and waits out the shutdown delay: the
		// upgrader says it is stopping, and its workers still serve.
		var st struct {
			Stopping bool `json:"stopping"`
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := control.Do(ctx, sock, control.Request{Command: "status"}, func(l []byte) error { return json.Unmarshal(l, &st) }); err != nil || !st.Stopping {
			t.Fatalf("status after the stop request: stopping=%v, %v", st.Stopping, err)
		}
		// A second stop signal turns the stop fast.
		b.cmd.Process.Signal(syscall.SIGTERM)
		b.wait(t)
	})
	t.Run("usage", func(t *testing.T) {
		if code, stderr := runStop(t, upgrader, "extra"); code != 2 {
			t.Fatalf("exit %d, want 2; stderr:\n%s", code, stderr)
		}
	})
}
