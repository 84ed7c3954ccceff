package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/internal/control"
)

// When hello runs out of fds, net/http reports its accept errors through
// srv.ErrorLog: they must come out as structured lines like every other
// line hello writes, and hello must serve again once fds are free.
func TestAcceptErrorsLogStructured(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binaries")
	}
	prlimit, err := exec.LookPath("prlimit")
	if err != nil {
		t.Skip("needs prlimit(1):", err)
	}
	dir := t.TempDir()
	upgrader, hello := filepath.Join(dir, "upgrader"), filepath.Join(dir, "hello")
	for pkg, out := range map[string]string{"../../cmd/upgrader": upgrader, ".": hello} {
		if b, err := exec.Command("go", "build", "-o", out, pkg).CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", pkg, err, b)
		}
	}
	ctl := filepath.Join(dir, "control.sock")
	// prlimit execs hello in its own process, so LISTEN_PID still matches.
	const maxFDs = 32
	cmd := exec.Command(upgrader, "--control", ctl, "--listen", "127.0.0.1:0", "--",
		prlimit, fmt.Sprintf("--nofile=%d:%d", maxFDs, maxFDs), hello)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		<-exited
	}()

	var addr string
	var pid int
	for deadline := time.Now().Add(30 * time.Second); addr == ""; {
		var st struct {
			Ready     bool `json:"ready"`
			Listeners []struct {
				Address string `json:"address"`
			} `json:"listeners"`
			Generations []struct {
				Workers []struct {
					Pid int `json:"pid"`
				} `json:"workers"`
			} `json:"generations"`
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := control.Do(ctx, ctl, control.Request{Command: "status"}, func(b []byte) error { return json.Unmarshal(b, &st) })
		cancel()
		if err == nil && st.Ready && len(st.Listeners) == 1 && len(st.Generations) == 1 && len(st.Generations[0].Workers) == 1 {
			addr, pid = st.Listeners[0].Address, st.Generations[0].Workers[0].Pid
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("hello not ready: %v; stderr:\n%s", err, &stderr)
		}
		select {
		case err := <-exited:
			t.Fatalf("upgrader exited: %v; stderr:\n%s", err, &stderr)
		case <-time.After(20 * time.Millisecond):
		}
	}

	// Twice as many open connections as hello may have fds: once its fd
	// table is full, with connections still queued, its next Accept fails
	// with EMFILE.
	var conns []net.Conn
	for range 2 * maxFDs {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	fds := fmt.Sprintf("/proc/%d/fd", pid)
	for deadline := time.Now().Add(30 * time.Second); ; {
		ents, err := os.ReadDir(fds)
		if err != nil {
			t.Fatal(err)
		}
		if len(ents) >= maxFDs {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("hello holds %d fds, never its limit %d", len(ents), maxFDs)
		}
		time.Sleep(5 * time.Millisecond)
	}
	for _, c := range conns {
		c.Close()
	}
	// Served again once the fds are free.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("no answer after the fds came free: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	c.Close()
	if !strings.HasPrefix(string(body), "hello from pid ") {
		t.Fatalf("answer %q", body)
	}

	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		exited <- err
		if err != nil {
			t.Fatalf("graceful stop: %v; stderr:\n%s", err, &stderr)
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("upgrader did not stop; stderr:\n%s", &stderr)
	}
	var acceptErrors int
	for _, line := range strings.Split(stderr.String(), "\n") {
		if !strings.Contains(line, "Accept error") {
			continue
		}
		acceptErrors++
		if !strings.HasPrefix(line, "time=") || !strings.Contains(line, "level=WARN") || !strings.Contains(line, "worker=hello") {
			t.Errorf("an accept error is not a structured line: %q", line)
		}
	}
	if acceptErrors == 0 {
		t.Fatalf("no accept error reported though hello ran out of fds; stderr:\n%s", &stderr)
	}
}
