package integration

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
	"github.com/seed6cb0314a/upgrader/supervise"
)

// requireNode fails the test when node is not on PATH: these tests are
// about the real Node.js, and a skip would hide that they did not run.
func requireNode(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("node"); err != nil {
		t.Fatalf("node is needed for this test (.ci/run installs it): %v", err)
	}
}

// TestNodeModuleUpgradesUnderLoad runs examples/node/server.js, on the
// upgrader-drain module, over Node's IPC channel through 20 upgrades.
func TestNodeModuleUpgradesUnderLoad(t *testing.T) {
	requireNode(t)
	server := filepath.Join(repoRoot, "examples/node/server.js")
	start := func(t *testing.T) *proc {
		return startUpgrader(t, "--ipc", "node", "-l", "127.0.0.1:0", "-w", "2", "--", "node", server)
	}
	t.Run("new-conn", func(t *testing.T) {
		p := start(t)
		addr := p.addr("")
		r := upgradeUnderLoad(t, p, loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.NewConn}, 20, 500*time.Millisecond)
		requireNoFailures(t, r)
		if r.ServerCloses != 0 || r.ClosedUnderClient != 0 {
			t.Fatalf("the server closed %d connections politely and %d under the client; want none", r.ServerCloses, r.ClosedUnderClient)
		}
		requireGenerations(t, r, 1, 21)
		t.Logf("handoffs: %+v", p.status().Handoffs)
		if code := p.stop(syscall.SIGTERM, 30*time.Second); code != 0 {
			t.Fatalf("graceful stop exited %d, want 0", code)
		}
	})
	t.Run("keep-alive", func(t *testing.T) {
		p := start(t)
		addr := p.addr("")
		r := upgradeUnderLoad(t, p, loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.KeepAlive, MaxIdle: 50 * time.Millisecond}, 20, 500*time.Millisecond)
		requireNoFailures(t, r)
		// The module handed every idle connection on.
		requireConnectionsCarried(t, r, 16)
		requireGenerations(t, r, 1, 21)
		st := p.status()
		t.Logf("handoffs: %+v", st.Handoffs)
		if st.Handoffs.HandedOff < 16 || st.Handoffs.Malformed != 0 {
			t.Fatalf("handoff counts %+v; want at least 16 handed off and nothing malformed", st.Handoffs)
		}
		if code := p.stop(syscall.SIGTERM, 30*time.Second); code != 0 {
			t.Fatalf("graceful stop exited %d, want 0", code)
		}
	})
}

// sendReq sends method target on c and returns the response, body read.
func sendReq(t *testing.T, c net.Conn, br *bufio.Reader, method, target string) *http.Response {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(c, "%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", method, target); err != nil {
		t.Fatalf("%s %s: write: %v", method, target, err)
	}
	return readResponse(t, br, method+" "+target)
}

func readResponse(t *testing.T, br *bufio.Reader, what string) *http.Response {
	t.Helper()
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("%s: read response: %v", what, err)
	}
	var sb strings.Builder
	if _, err := bufio.NewReader(resp.Body).WriteTo(&sb); err != nil {
		t.Fatalf("%s: read body: %v", what, err)
	}
	resp.Body.Close()
	return resp
}

type rawConn struct {
	c  net.Conn
	br *bufio.Reader
}

// twoConnsToOneWorker opens connections to addr until two were accepted by
// the same worker, and returns them with that worker's pid.
func twoConnsToOneWorker(t *testing.T, addr string) (a, b rawConn, pid int) {
	t.Helper()
	byPid := map[int]rawConn{}
	for range 20 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		rc := rawConn{c, bufio.NewReader(c)}
		resp := sendReq(t, c, rc.br, "GET", "/")
		p, err := strconv.Atoi(resp.Header.Get("X-Pid"))
		if resp.StatusCode != 200 || err != nil {
			t.Fatalf("GET /: %d, X-Pid %q", resp.StatusCode, resp.Header.Get("X-Pid"))
		}
		if first, ok := byPid[p]; ok {
			return first, rc, p
		}
		byPid[p] = rc
	}
	t.Fatalf("20 connections to %s, none two to the same worker: %v", addr, byPid)
	return
}

// workerByPid finds pid's record in st.
func workerByPid(st supervise.Status, pid int) (supervise.GenStatus, supervise.WorkerRecord, bool) {
	for _, g := range st.Generations {
		for _, w := range g.Workers {
			if w.Pid == pid {
				return g, w, true
			}
		}
	}
	return supervise.GenStatus{}, supervise.WorkerRecord{}, false
}

// TestNodeModuleUncaughtExceptionUnderLoad: a worker on the module throws
// an uncaught exception under keep-alive load, with a slow request in
// flight. The module says "stopping" and drains; upgrader starts a
// replacement in its slot at once, which is ready before the crashed worker
// exits, and no client sees anything of it: no request fails and no
// connection is closed under a client or while idle. With one worker, its
// idle connections wait in upgrader for the replacement and go to it.
func TestNodeModuleUncaughtExceptionUnderLoad(t *testing.T) {
	requireNode(t)
	for _, workers := range []int{2, 1} {
		t.Run(fmt.Sprintf("workers-%d", workers), func(t *testing.T) { crashUnderLoad(t, workers) })
	}
}

func crashUnderLoad(t *testing.T, workers int) {
	p := startUpgrader(t, "--ipc", "node", "-l", "127.0.0.1:0", "-w", strconv.Itoa(workers), "--",
		"node", filepath.Join(repoRoot, "integration/testdata/node-crash.js"))
	addr := p.addr("")
	p.waitReady(1)
	l := startLoad(loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.KeepAlive, MaxIdle: 50 * time.Millisecond})
	l.waitServed(t, 1, 200)

	slow, crash, old := twoConnsToOneWorker(t, addr)
	_, rec, ok := workerByPid(p.status(), old)
	if !ok || rec.State != supervise.WorkerReady {
		t.Fatalf("worker pid %d: %+v, want a ready worker", old, rec)
	}
	slot := rec.Slot

	// The slow request is in the worker when the crash comes.
	slow.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(slow.c, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	waitConsumed(t, slow.c, old)
	slowResp := make(chan *http.Response, 1)
	go func() {
		resp, err := http.ReadResponse(slow.br, nil)
		if err != nil {
			t.Errorf("the slow request in flight at the crash: %v", err)
			slowResp <- nil
			return
		}
		resp.Body.Close()
		slowResp <- resp
	}()
	if resp := sendReq(t, crash.c, crash.br, "POST", "/crash"); resp.StatusCode != 200 || resp.Header.Get("X-Pid") != strconv.Itoa(old) {
		t.Fatalf("POST /crash: %d from pid %s, want 200 from %d", resp.StatusCode, resp.Header.Get("X-Pid"), old)
	}

	// Follow the crashed worker until its main process has exited: at
	// every point its generation serves, and there is a point where it
	// still runs, asked to stop for "stopping", and a replacement in its
	// slot is ready.
	var cause string
	var replacement supervise.WorkerRecord
	polls := 0
	p.waitStatus(30*time.Second, fmt.Sprintf("crashed worker pid %d exited", old), func(st supervise.Status) bool {
		polls++
		g, w, ok := workerByPid(st, old)
		if ok && w.State != supervise.WorkerLingering {
			if w.State == supervise.WorkerDraining {
				cause = w.Cause
			}
			if w.State == supervise.WorkerDraining && replacement.Pid == 0 {
				for _, r := range g.Workers {
					if r.Slot == slot && r.Pid != old && r.State == supervise.WorkerReady {
						replacement = r
					}
				}
			}
		}
		// With one worker, upgrader is not ready (truly) while the
		// replacement starts; connections wait in the listener's queue.
		if cur := genOf(st, 1); cur == nil || st.Current != 1 || (workers > 1 && !st.Ready) {
			t.Errorf("no ready worker while pid %d crashed: status %+v", old, st)
		}
		return !ok || w.State == supervise.WorkerLingering
	})
	if cause != string(supervise.RestartStopping) {
		t.Errorf("the crashed worker's cause while it drained: %q, want %q", cause, supervise.RestartStopping)
	}
	if replacement.Pid == 0 {
		t.Fatalf("no replacement in slot %d was ready while the crashed worker pid %d still ran (%d polls)", slot, old, polls)
	}
	resp := <-slowResp
	if resp == nil {
		t.FailNow()
	}
	if resp.StatusCode != 200 || resp.Header.Get("X-Pid") != strconv.Itoa(old) {
		t.Fatalf("slow request: %d from pid %s, want 200 from the crashed worker %d", resp.StatusCode, resp.Header.Get("X-Pid"), old)
	}
	p.expectLogged(5*time.Second, "the crashed worker's exit as a stopping one", func(m map[string]any) bool {
		return m["pid"] == float64(old) && m["cause"] == string(supervise.RestartStopping) &&
			strings.Contains(fmt.Sprint(m["status"]), "exited with status 1")
	})

	l.waitServed(t, 1, 200) // the load goes on, on both slots
	r := l.stop()
	requireNoFailures(t, r)
	if r.Counts[loadgen.Refused] != 0 {
		t.Fatalf("%d connections refused", r.Counts[loadgen.Refused])
	}
	// Busy connections get Connection: close (polite); no other close.
	if r.ClosedUnderClient != 0 || r.IdleClosed != 0 {
		t.Fatalf("connections closed under the client or while idle: %s", r)
	}
	st := p.status()
	g := genOf(st, 1)
	if g == nil || len(g.Workers) != workers || st.Restarts != 1 || g.Workers[slot].Pid != replacement.Pid || g.Workers[slot].State != supervise.WorkerReady {
		t.Fatalf("after the crash: restarts %d, generation 1 %+v; want 2 ready workers, pid %d in slot %d", st.Restarts, g, replacement.Pid, slot)
	}
	if workers == 1 && st.Handoffs.HandedOff == 0 {
		t.Fatalf("handoffs %+v: the lone worker's idle connections did not go to its replacement", st.Handoffs)
	}
	t.Logf("%s; crashed pid %d, replacement pid %d ready at %s (%d polls); handoffs %+v",
		r, old, replacement.Pid, replacement.ReadyAt.Format(time.StampMicro), polls, st.Handoffs)
}

// TestNodeChannelFloodStaysBounded: a worker floods its Node IPC channel
// with handoffs of one socket, application messages and malformed ones;
// upgrader refuses each handoff (no other worker to take it), holds no fd
// of them, and upgrades and serves on.
func TestNodeChannelFloodStaysBounded(t *testing.T) {
	requireNode(t)
	const n = 20000
	p := startUpgraderEnv(t, []string{"FLOOD_N=" + strconv.Itoa(n)}, "--ipc", "node", "-l", "127.0.0.1:0", "--",
		"node", filepath.Join(repoRoot, "integration/testdata/node-flood.js"))
	addr := p.addr("")
	p.waitReady(1)
	base := countFDs(t, p.pid)
	peak := base
	st := p.waitStatus(2*time.Minute, fmt.Sprintf("the worker saw its %d handoffs answered", n), func(st supervise.Status) bool {
		peak = max(peak, countFDs(t, p.pid))
		g := genOf(st, 1)
		return g != nil && len(g.Workers) == 1 && strings.HasPrefix(g.Workers[0].Status, "flood answered")
	})
	after := countFDs(t, p.pid)
	t.Logf("upgrader fds: %d before the flood, %d at most during it, %d after; handoffs %+v; worker: %q",
		base, peak, after, st.Handoffs, genOf(st, 1).Workers[0].Status)
	if peak >= base+100 || after >= base+100 {
		t.Fatalf("upgrader held %d fds during the flood and %d after, from %d before", peak, after, base)
	}
	if want := fmt.Sprintf("flood answered %d acked 0", n); genOf(st, 1).Workers[0].Status != want {
		t.Fatalf("worker status %q, want %q", genOf(st, 1).Workers[0].Status, want)
	}
	if st.Handoffs.Refused != n || st.Handoffs.HandedOff != 0 || st.Handoffs.Malformed != 6 {
		t.Fatalf("handoff counts %+v; want %d refused, none handed off, the 6 bad messages malformed", st.Handoffs, n)
	}
	p.upgradeTo(2)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if resp := sendReq(t, c, bufio.NewReader(c), "GET", "/"); resp.StatusCode != 200 || resp.Header.Get("X-Generation") != "2" {
		t.Fatalf("after the flood and an upgrade: %d from generation %s, want 200 from 2", resp.StatusCode, resp.Header.Get("X-Generation"))
	}
	if final := countFDs(t, p.pid); final >= base+100 {
		t.Fatalf("upgrader holds %d fds after the upgrade, %d before the flood", final, base)
	}
}
