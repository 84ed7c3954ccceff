package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/internal/control"
)

// build compiles the upgrader and the hello worker into dir.
func build(t *testing.T, dir string) (upgrader, hello string) {
	t.Helper()
	upgrader, hello = filepath.Join(dir, "upgrader"), filepath.Join(dir, "hello")
	for pkg, out := range map[string]string{".": upgrader, "../../examples/hello": hello} {
		if b, err := exec.Command("go", "build", "-o", out, pkg).CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", pkg, err, b)
		}
	}
	return upgrader, hello
}

type instance struct {
	cmd    *exec.Cmd
	stderr *bytes.Buffer
	exited chan error
}

func start(t *testing.T, runtime, bin string, args ...string) *instance {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "RUNTIME_DIRECTORY="+runtime)
	in := &instance{cmd: cmd, stderr: new(bytes.Buffer), exited: make(chan error, 1)}
	cmd.Stderr = in.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { in.exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-in.exited
		in.exited <- nil
	})
	return in
}

// wait returns the exit status, failing the test if the process runs on.
func (in *instance) wait(t *testing.T) int {
	t.Helper()
	select {
	case err := <-in.exited:
		in.exited <- err
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(30 * time.Second):
		t.Fatalf("%s still running; stderr:\n%s", in.cmd.Args, in.stderr)
		return -1
	}
}

// waitServing polls the control socket until the upgrader with pid answers
// there with a ready generation.
func waitServing(t *testing.T, in *instance, path string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var st struct {
			Pid   int  `json:"pid"`
			Ready bool `json:"ready"`
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := control.Do(ctx, path, control.Request{Command: "status"}, func(b []byte) error { return json.Unmarshal(b, &st) })
		cancel()
		if err == nil && st.Pid == in.cmd.Process.Pid && st.Ready {
			return
		}
		select {
		case err := <-in.exited:
			in.exited <- err
			t.Fatalf("upgrader exited (%v) before serving; stderr:\n%s", err, in.stderr)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("upgrader pid %d not serving on %s: last status %+v, %v; stderr:\n%s", in.cmd.Process.Pid, path, st, err, in.stderr)
		}
	}
}

func mustContain(t *testing.T, what, s string, wants ...string) {
	t.Helper()
	for _, w := range wants {
		if !strings.Contains(s, w) {
			t.Errorf("%s does not say %q:\n%s", what, w, s)
		}
	}
}

// Two upgraders started with the defaults share the runtime directory and
// so the control socket path: the second refuses, says why and what to do,
// and the first keeps its socket. After a SIGKILL of the first, the stale
// control socket and pid file do not stop a new one.
func TestSecondInstanceAndStaleFiles(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: this test builds and runs the binaries")
	}
	dir := t.TempDir()
	upgrader, hello := build(t, dir)
	runtime := filepath.Join(dir, "run")
	if err := os.Mkdir(runtime, 0o700); err != nil {
		t.Fatal(err)
	}
	sock, pidFile := filepath.Join(runtime, "upgrader.sock"), filepath.Join(runtime, "upgrader.pid")

	a := start(t, runtime, upgrader, "--listen", "127.0.0.1:0", "--pid-file", pidFile, "--", hello)
	waitServing(t, a, sock)

	t.Run("default control path taken", func(t *testing.T) {
		b := start(t, runtime, upgrader, "--listen", "127.0.0.1:0", "--", hello)
		if code := b.wait(t); code != 1 {
			t.Errorf("second upgrader exited %d, want 1", code)
		}
		mustContain(t, "the second upgrader's error", b.stderr.String(),
			sock, fmt.Sprintf("another upgrader (pid %d)", a.cmd.Process.Pid), "--control PATH", "--control none")
		waitServing(t, a, sock) // the first still has it
	})
	t.Run("pid file taken", func(t *testing.T) {
		c := start(t, runtime, upgrader, "--listen", "127.0.0.1:0", "--control", filepath.Join(runtime, "c.sock"), "--pid-file", pidFile, "--", hello)
		if code := c.wait(t); code != 1 {
			t.Errorf("upgrader with a taken pid file exited %d, want 1", code)
		}
		mustContain(t, "the error", c.stderr.String(), pidFile, fmt.Sprintf("another upgrader (pid %d)", a.cmd.Process.Pid))
		if b, err := os.ReadFile(pidFile); err != nil || string(b) != fmt.Sprintf("%d\n", a.cmd.Process.Pid) {
			t.Errorf("pid file now holds %q (%v), want the first upgrader's pid", b, err)
		}
	})

	a.cmd.Process.Signal(syscall.SIGKILL)
	a.wait(t)
	for _, p := range []string{sock, pidFile} {
		if _, err := os.Lstat(p); err != nil {
			t.Fatalf("SIGKILL left no %s to test with: %v", p, err)
		}
	}
	d := start(t, runtime, upgrader, "--listen", "127.0.0.1:0", "--pid-file", pidFile, "--", hello)
	waitServing(t, d, sock)
	if b, err := os.ReadFile(pidFile); err != nil || string(b) != fmt.Sprintf("%d\n", d.cmd.Process.Pid) {
		t.Errorf("pid file holds %q (%v), want %d", b, err, d.cmd.Process.Pid)
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	if code := d.wait(t); code != 0 {
		t.Fatalf("graceful stop exited %d; stderr:\n%s", code, d.stderr)
	}
	for _, p := range []string{sock, pidFile} {
		if _, err := os.Lstat(p); !os.IsNotExist(err) {
			t.Errorf("%s left after a graceful stop: %v", p, err)
		}
	}
}

// Bad flag values stop the upgrader with status 2 before it runs anything.
func TestBadFlagsExitUsage(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: this test builds and runs the binaries")
	}
	dir := t.TempDir()
	upgrader, _ := build(t, dir)
	marker := filepath.Join(dir, "ran")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--drain-timeout", "-1s"}, "--drain-timeout -1s"},
		{[]string{"--ready-timeout", "0"}, "--ready-timeout 0"},
		{[]string{"--max-restarts", "-1"}, "--max-restarts -1"},
		{[]string{"--listen", "web=127.0.0.1:0", "--listen", "web=127.0.0.1:0"}, `listener name "web"`},
	} {
		args := append(append([]string{"--control", "none"}, tc.args...), "--", "touch", marker)
		in := start(t, dir, upgrader, args...)
		if code := in.wait(t); code != 2 {
			t.Errorf("%q: exit status %d, want 2; stderr:\n%s", tc.args, code, in.stderr)
		}
		mustContain(t, fmt.Sprintf("%q", tc.args), in.stderr.String(), tc.want)
		if _, err := os.Stat(marker); err == nil {
			t.Fatalf("%q: the command ran", tc.args)
		}
	}
}
