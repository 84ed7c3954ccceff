package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/internal/control"
	"github.com/seed6cb0314a/upgrader/internal/proctree"
)

// When hello runs out of fds, net/http reports its accept errors through
// srv.ErrorLog: they must come out as structured lines like every other
// line hello writes, and hello must serve again once fds are free.
func TestAcceptErrorsLogStructured(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: this test builds and runs the binaries")
	}
	prlimit, err := exec.LookPath("prlimit")
	if err != nil {
		t.Skip("needs prlimit(1):", err)
	}
	dir := t.TempDir()
	upgrader, hello := binaries(t)
	ctl := filepath.Join(dir, "control.sock")
	// prlimit execs hello in its own process, so LISTEN_PID still matches.
	const maxFDs = 32
	cmd := exec.Command(upgrader, "--control", ctl, "--listen", "127.0.0.1:0", "--",
		prlimit, fmt.Sprintf("--nofile=%d:%d", maxFDs, maxFDs), hello)
	stderr := &bytes.Buffer{}
	addr, pid, exited := runUnder(t, cmd, ctl, stderr)

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
			t.Fatalf("graceful stop: %v; stderr:\n%s", err, stderr)
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("upgrader did not stop; stderr:\n%s", stderr)
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
		t.Fatalf("no accept error reported though hello ran out of fds; stderr:\n%s", stderr)
	}
}

var (
	buildOnce             sync.Once
	buildDir              string
	upgraderBin, helloBin string
	buildErr              error
)

// TestMain removes the binaries built for the tests.
func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// binaries builds upgrader and hello once for every test.
func binaries(t *testing.T) (upgrader, hello string) {
	t.Helper()
	buildOnce.Do(func() {
		if buildDir, buildErr = os.MkdirTemp("", "hello-test-"); buildErr != nil {
			return
		}
		upgraderBin, helloBin = filepath.Join(buildDir, "upgrader"), filepath.Join(buildDir, "hello")
		for pkg, out := range map[string]string{"../../cmd/upgrader": upgraderBin, ".": helloBin} {
			if b, err := exec.Command("go", "build", "-o", out, pkg).CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("go build %s: %v\n%s", pkg, err, b)
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return upgraderBin, helloBin
}

// With a TCP and a UDP socket inherited, hello serves
// the TCP one and binds nothing of its own. It used to take as many
// listeners as it inherited fds: the UDP socket counted, found no stream
// listener, and bound one on -addr.
func TestServesInheritedListenersOnly(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: this test builds and runs the binaries")
	}
	upgrader, hello := binaries(t)
	ctl := filepath.Join(t.TempDir(), "control.sock")
	cmd := exec.Command(upgrader, "--control", ctl, "-l", "web=tcp://127.0.0.1:0", "-l", "dns=udp://127.0.0.1:0", "--",
		hello, "-addr", "127.0.0.1:0")
	stderr := &bytes.Buffer{}
	web, pid, _ := runUnder(t, cmd, ctl, stderr)
	// hello is ready: it has every listener it will have.
	got := listening(t, pid)
	if len(got) != 1 || got[0] != web {
		t.Fatalf("hello listens on %q, want only the inherited %s; stderr:\n%s", got, web, stderr)
	}
	resp, err := http.Get("http://" + web + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET on the inherited listener: %s", resp.Status)
	}
}

// listening lists the addresses of the listening TCP sockets pid holds.
func listening(t *testing.T, pid int) []string {
	t.Helper()
	var out []string
	for _, a := range proctree.TCPSockets("/proc", pid, proctree.TCPListen, proctree.SocketInodes("/proc", pid)) {
		out = append(out, a)
	}
	return out
}

// runUnder starts cmd (upgrader running hello, its control socket at ctl,
// stderr into stderr) and waits until its one worker is ready; it returns
// the first TCP listener's address, the worker's pid, and a channel that
// gets cmd.Wait's result (put back by whoever takes it). The test's end
// kills upgrader.
func runUnder(t *testing.T, cmd *exec.Cmd, ctl string, stderr *bytes.Buffer) (addr string, pid int, exited chan error) {
	t.Helper()
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited = make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	for deadline := time.Now().Add(30 * time.Second); ; {
		var st struct {
			Ready     bool `json:"ready"`
			Listeners []struct {
				Network string `json:"network"`
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
		if err == nil && st.Ready && len(st.Generations) == 1 && len(st.Generations[0].Workers) == 1 {
			for _, l := range st.Listeners {
				if strings.HasPrefix(l.Network, "tcp") && addr == "" {
					addr = l.Address
				}
			}
			return addr, st.Generations[0].Workers[0].Pid, exited
		}
		if time.Now().After(deadline) {
			t.Fatalf("hello not ready: %v; stderr:\n%s", err, stderr)
		}
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("upgrader exited: %v; stderr:\n%s", err, stderr)
		case <-time.After(20 * time.Millisecond): // polling interval
		}
	}
}

// The ?size= body is the documented pattern, byte i = byte(i*7 + i>>10),
// across chunk and period boundaries, and exactly as long as asked.
func TestWritePattern(t *testing.T) {
	for _, n := range []int64{0, 1, 64<<10 - 1, 64 << 10, 256<<10 + 3, 3<<20 + 17} {
		var b bytes.Buffer
		if err := writePattern(&b, n); err != nil {
			t.Fatal(err)
		}
		if int64(b.Len()) != n {
			t.Fatalf("size %d: wrote %d bytes", n, b.Len())
		}
		for i, c := range b.Bytes() {
			if want := byte(i*7 + i>>10); c != want {
				t.Fatalf("size %d: byte %d is %#x, want %#x", n, i, c, want)
			}
		}
	}
}

// -tls serves TLS with HTTP/2 by ALPN and HTTP/1.1 otherwise; -h2c serves
// HTTP/2 with prior knowledge and HTTP/1.1 on cleartext. Every response
// names its generation and ?size= sets the body and its length, with ?tail=
// (which holds the handler after the body is flushed: the connection-kinds test shows
// what that does to a drain) or without; a bad ?tail= is refused.
func TestProtocolsSizeAndTail(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: this test builds and runs the binaries")
	}
	upgrader, hello := binaries(t)
	for _, tc := range []struct {
		flag   string
		scheme string
		protos []func(*http.Protocols, bool) // set on the client, one client each
		want   []int                         // the ProtoMajor each gets
	}{
		{"-tls", "https", []func(*http.Protocols, bool){(*http.Protocols).SetHTTP2, (*http.Protocols).SetHTTP1}, []int{2, 1}},
		{"-h2c", "http", []func(*http.Protocols, bool){(*http.Protocols).SetUnencryptedHTTP2, (*http.Protocols).SetHTTP1}, []int{2, 1}},
	} {
		t.Run(tc.flag, func(t *testing.T) {
			ctl := filepath.Join(t.TempDir(), "control.sock")
			cmd := exec.Command(upgrader, "--control", ctl, "-l", "127.0.0.1:0", "--", hello, tc.flag)
			stderr := &bytes.Buffer{}
			addr, _, _ := runUnder(t, cmd, ctl, stderr)
			for i, set := range tc.protos {
				tr := &http.Transport{Protocols: new(http.Protocols), TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}
				set(tr.Protocols, true)
				defer tr.CloseIdleConnections()
				cl := &http.Client{Transport: tr, Timeout: 30 * time.Second}
				query := []string{"size=300000&tail=20ms", "size=300000"}[i%2]
				const size = 300_000
				resp, err := cl.Get(tc.scheme + "://" + addr + "/?" + query)
				if err != nil {
					t.Fatalf("%s: %v; stderr:\n%s", tr.Protocols, err, stderr)
				}
				b, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil || resp.StatusCode != 200 || resp.ProtoMajor != tc.want[i] || resp.Header.Get("X-Generation") != "1" {
					t.Fatalf("%s: %s over %s, generation %q, err %v; want 200 over HTTP/%d from generation 1",
						tr.Protocols, resp.Status, resp.Proto, resp.Header.Get("X-Generation"), err, tc.want[i])
				}
				if resp.ContentLength != size || len(b) != size {
					t.Fatalf("%s: Content-Length %d, body %d bytes; want %d", tr.Protocols, resp.ContentLength, len(b), size)
				}
				for j, c := range b {
					if c != byte(j*7+j>>10) {
						t.Fatalf("%s: byte %d of the body is %#x, want the pattern's %#x", tr.Protocols, j, c, byte(j*7+j>>10))
					}
				}
				resp, err = cl.Get(tc.scheme + "://" + addr + "/?size=10&tail=soon")
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if resp.StatusCode != http.StatusBadRequest {
					t.Fatalf("%s: ?tail=soon answered %s, want 400", tr.Protocols, resp.Status)
				}
			}
		})
	}
}
