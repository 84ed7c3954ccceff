package integration

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A SIGKILL of upgrader must not cut what its workers are answering: each
// worker's parent-death signal is its drain signal, so the request in
// flight completes, an idle keep-alive connection is closed by the drain
// (an EOF where the client expects its next response, never a reset), and
// the worker exits on its own well before any drain timeout. Nothing is
// left holding the listener: the address then refuses.
func TestKilledUpgraderLetsWorkersFinish(t *testing.T) {
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--", helloBin)
	addr := p.addr("")
	p.waitReady(1)
	worker := p.workerPids(1)[0]

	idle, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	idleR := bufio.NewReader(idle)
	if _, err := io.WriteString(idle, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	if resp, err := http.ReadResponse(idleR, nil); err != nil || resp.StatusCode != 200 {
		t.Fatalf("the keep-alive connection's first request: %v, %v", resp, err)
	} else {
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}

	busy, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	if _, err := io.WriteString(busy, "GET /?sleep=1s HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	waitConsumed(t, busy, worker)

	if err := syscall.Kill(p.pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill -9 upgrader pid %d: %v", p.pid, err)
	}
	<-p.done

	busy.SetDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(busy), nil)
	if err != nil {
		t.Fatalf("the request in flight when upgrader was killed: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != 200 || !strings.Contains(string(body), "pid "+strconv.Itoa(worker)) {
		t.Fatalf("the request in flight when upgrader was killed: status %d, body %q, %v; want 200 from worker %d", resp.StatusCode, body, err, worker)
	}
	if resp.Header.Get("Connection") != "close" && !resp.Close {
		t.Errorf("the response in flight during the drain has no Connection: close")
	}

	idle.SetDeadline(time.Now().Add(10 * time.Second))
	if n, err := idleR.ReadByte(); !errors.Is(err, io.EOF) {
		t.Errorf("the idle keep-alive connection after the kill: read %q, %v; want EOF (closed by the drain)", n, err)
	}

	// The drain's own timeout is 25 s: gone well before, it drained.
	waitGone(t, worker, 10*time.Second)
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err == nil {
		c.Close()
		t.Fatalf("%s still accepts connections after the orphaned worker exited", addr)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("connect to %s after the orphaned worker exited: %v, want ECONNREFUSED", addr, err)
	}
}
