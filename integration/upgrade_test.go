package integration

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
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

// upgradeUnderLoad runs n upgrades by USR2 under load, interval apart, and
// returns the load's result once generation n+1 is serving. Each USR2 is
// sent once the previous upgrade is ready: one sent earlier would be queued
// and coalesced with the next (as specified), which a slow starter under
// load makes likely.
func upgradeUnderLoad(t *testing.T, p *proc, cfg loadgen.Config, n int, interval time.Duration) loadgen.Result {
	t.Helper()
	p.waitReady(1)
	l := startLoad(cfg)
	for i := 0; i < n; i++ {
		time.Sleep(interval) // each generation serves the load this long
		p.signal(syscall.SIGUSR2)
		p.waitReady(i + 2)
	}
	l.waitServed(t, n+1, 50) // the newest generation serves the load
	return l.stop()
}

func requireGenerations(t *testing.T, r loadgen.Result, from, to int) {
	t.Helper()
	for g := from; g <= to; g++ {
		if r.Generations[strconv.Itoa(g)] == 0 {
			t.Errorf("no response from generation %d; served by: %v", g, r.Generations)
		}
	}
}

func TestUpgradesUnderLoadNewConnections(t *testing.T) {
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--", helloBin)
	addr := p.addr("")
	r := upgradeUnderLoad(t, p, loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.NewConn}, 20, 500*time.Millisecond)
	requireNoFailures(t, r)
	requireGenerations(t, r, 1, 21)
	if code := p.stop(syscall.SIGTERM, 30*time.Second); code != 0 {
		t.Fatalf("graceful stop exited %d, want 0", code)
	}
}

// TestUpgradesUnderLoadKeepAlive is the drain without handoff: idle
// keep-alive connections are closed the polite way. (With handoff, the
// default, they are not closed at all: handoff_test.go.)
func TestUpgradesUnderLoadKeepAlive(t *testing.T) {
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--no-handoff", "--", helloBin)
	addr := p.addr("")
	r := upgradeUnderLoad(t, p, loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.KeepAlive, MaxIdle: 50 * time.Millisecond}, 20, 500*time.Millisecond)
	requireNoFailures(t, r)
	if r.ClosedUnderClient != 0 || r.IdleClosed != 0 {
		t.Fatalf("%d connections were closed under their client, %d while idle", r.ClosedUnderClient, r.IdleClosed)
	}
	// Draining workers close keep-alive connections the polite way: a
	// response with "Connection: close". Each upgrade does it to every client.
	if r.ServerCloses < 16 {
		t.Fatalf("only %d polite server closes over 20 upgrades of 16 keep-alive clients", r.ServerCloses)
	}
	requireGenerations(t, r, 1, 21)
}

func TestInFlightRequestCompletesAcrossUpgrade(t *testing.T) {
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--", helloBin)
	addr := p.addr("")
	p.waitReady(1)
	type reply struct {
		code int
		gen  string
		err  error
	}
	// A request that is in generation 1's worker before the upgrade.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("POST /?sleep=3s HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")); err != nil {
		t.Fatal(err)
	}
	waitConsumed(t, c, p.workerPids(1)[0])
	done := make(chan reply, 1)
	go func() {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			done <- reply{err: err}
			return
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		done <- reply{code: resp.StatusCode, gen: resp.Header.Get("X-Generation")}
	}()
	p.signal(syscall.SIGUSR2)
	p.waitReady(2)
	p.waitStatus(5*time.Second, "generation 1 draining", func(st supervise.Status) bool {
		g := genOf(st, 1)
		return g == nil || g.State == supervise.GenDraining
	})
	r := <-done
	if r.err != nil || r.code != 200 || r.gen != "1" {
		t.Fatalf("in-flight request: code %d, generation %q, err %v; want 200 from generation 1", r.code, r.gen, r.err)
	}
	p.waitExited(1)
}

func TestFailedUpgradesKeepOldGenerationServing(t *testing.T) {
	p, script, addr := startScripted(t, "exec "+helloBin, "--ready-timeout", "2s")
	l := startLoad(loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.NewConn})
	failed := func(gen int) string {
		t.Helper()
		st := p.waitStatus(10*time.Second, fmt.Sprintf("upgrade to generation %d over", gen), func(st supervise.Status) bool {
			return st.LastUpgrade != nil && st.LastUpgrade.Generation == gen
		})
		if st.LastUpgrade.OK || st.Current != 1 {
			t.Fatalf("upgrade %+v, generation %d current; want a failed upgrade and generation 1 serving", st.LastUpgrade, st.Current)
		}
		return st.LastUpgrade.Reason
	}

	// A version that exits 1 at start.
	writeScript(t, script, "echo 'cannot start: bad config' >&2; exit 1")
	p.signal(syscall.SIGUSR2)
	if reason := failed(2); !strings.Contains(reason, "exited with status 1 before it was ready") {
		t.Errorf("failure reason %q does not say the worker exited 1 before ready", reason)
	}

	// A version that serves on the shared listener but never says READY=1:
	// it is stopped by the drain signal, so what it accepted still completes.
	writeScript(t, script, "exec env -u NOTIFY_SOCKET "+helloBin)
	p.signal(syscall.SIGUSR2)
	if reason := failed(3); !strings.Contains(reason, "not ready within 2s") {
		t.Errorf("failure reason %q does not name the ready timeout", reason)
	}
	p.waitExited(3)
	l.waitServed(t, 1, 100) // generation 1 serves on after generation 3 has gone
	r := l.stop()
	requireNoFailures(t, r)
	if r.Generations["1"] == 0 || r.Generations["2"] != 0 {
		t.Fatalf("served by %v; want generation 1 throughout", r.Generations)
	}

	// The old generation still serves, and a good version upgrades after all.
	writeScript(t, script, "exec "+helloBin)
	p.signal(syscall.SIGUSR2)
	p.waitReady(4)
}

func TestQueuedUpgrade(t *testing.T) {
	dir := t.TempDir()
	script := filepath.Join(dir, "run")
	// A slow starter: the second and third USR2 arrive while generation 2
	// is starting; exactly one more upgrade follows it.
	writeScript(t, script, "sleep 0.5; exec "+helloBin)
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--", script)
	p.waitReady(1)
	p.signal(syscall.SIGUSR2)
	p.waitStatus(5*time.Second, "generation 2 starting", func(st supervise.Status) bool { return genOf(st, 2) != nil })
	p.signal(syscall.SIGUSR2)
	p.signal(syscall.SIGUSR2)
	p.waitReady(2)
	p.waitReady(3)
	// A negative check over a fixed window of two start-ups of the slow
	// starter: no fourth generation appears.
	for start := time.Now(); time.Since(start) < time.Second; time.Sleep(20 * time.Millisecond) {
		if st := p.status(); st.Current != 3 || len(st.Generations) == 0 || st.Generations[len(st.Generations)-1].N != 3 {
			t.Fatalf("two USR2s during an upgrade queued more than one upgrade: current %d, generations %+v", st.Current, st.Generations)
		}
	}
}

func TestPythonAndNodeWorkersUpgradeUnderLoad(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"python", []string{"--", "python3", filepath.Join(repoRoot, "examples/python/worker.py")}},
		{"node", []string{"--ipc", "node", "--", "node", filepath.Join(repoRoot, "examples/node/server.js")}},
		// Without a channel, the module says ready on the --ready fd.
		{"node-ready-fd", []string{"--ready", "fd:4", "--", "node", filepath.Join(repoRoot, "examples/node/server.js")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := exec.LookPath(tc.args[len(tc.args)-2]); err != nil {
				t.Fatalf("%s is needed for this test (.ci/run installs it): %v", tc.name, err)
			}
			p := startUpgrader(t, append([]string{"-l", "127.0.0.1:0"}, tc.args...)...)
			addr := p.addr("")
			r := upgradeUnderLoad(t, p, loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.NewConn}, 10, 500*time.Millisecond)
			requireNoFailures(t, r)
			requireGenerations(t, r, 1, 11)
			if code := p.stop(syscall.SIGTERM, 30*time.Second); code != 0 {
				t.Fatalf("graceful stop exited %d, want 0", code)
			}
		})
	}
}

func TestNoLeaksAfter100Upgrades(t *testing.T) {
	p := startUpgrader(t, "-l", "127.0.0.1:0", "-l", "unix://"+filepath.Join(t.TempDir(), "s.sock"), "--workers", "2", "--", helloBin)
	p.waitReady(1)
	// The TCP listener's reuseport group is whole by generation 3: the
	// listener's own socket, idle once generation 1 has gone, and the two
	// that the generations take in turn.
	p.upgradeTo(2)
	p.upgradeTo(3)
	p.waitSpares(2) // one per worker, and their fds
	first := countFDs(t, p.pid)
	for gen := 4; gen <= 101; gen++ {
		p.upgradeTo(gen)
	}
	p.waitSpares(2)
	if after := countFDs(t, p.pid); after != first {
		t.Fatalf("supervisor has %d fds after 100 upgrades, %d after the second", after, first)
	}
	kids := children(t, p.pid)
	if len(kids) != 2 {
		t.Errorf("supervisor has %d children %v, want the 2 workers of generation 101", len(kids), kids)
	}
	for pid, st := range kids {
		if st == "Z" {
			t.Errorf("zombie child %d", pid)
		}
	}
	// The supervisor's own copies of the listeners are still non-blocking.
	requireNonBlockingSockets(t, p.pid)
	if code := p.stop(syscall.SIGTERM, 30*time.Second); code != 0 {
		t.Fatalf("graceful stop exited %d, want 0", code)
	}
}

// requireNonBlockingSockets checks O_NONBLOCK on every socket fd of pid.
func requireNonBlockingSockets(t *testing.T, pid int) {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		target, _ := os.Readlink(filepath.Join(dir, e.Name()))
		if !strings.HasPrefix(target, "socket:") {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "flags:"); ok {
				flags, _ := strconv.ParseUint(strings.TrimSpace(v), 8, 64)
				if flags&syscall.O_NONBLOCK == 0 {
					t.Errorf("supervisor fd %s (%s) is blocking: flags %o", e.Name(), target, flags)
				}
				n++
			}
		}
	}
	if n < 2 {
		t.Fatalf("found %d socket fds in the supervisor, want at least the 2 listeners", n)
	}
}

func TestWorkerContract(t *testing.T) {
	// The worker is sleep(1), which opens nothing of its own: what the test
	// reads from /proc is exactly what upgrader gave it.
	p := startUpgrader(t, "-l", "web=127.0.0.1:0", "-l", "udp://127.0.0.1:0", "--ready", "delay:100ms", "--", "sleep", "60")
	p.waitReady(1)
	pid := p.workerPids(1)[0]
	env := environ(t, pid)
	if env["LISTEN_PID"] != strconv.Itoa(pid) {
		t.Errorf("LISTEN_PID=%s, worker pid %d", env["LISTEN_PID"], pid)
	}
	if env["LISTEN_FDS"] != "2" || !strings.HasPrefix(env["LISTEN_FDNAMES"], "web:udp-127.0.0.1-") {
		t.Errorf("LISTEN_FDS=%q LISTEN_FDNAMES=%q, want 2 and web:udp-127.0.0.1-PORT", env["LISTEN_FDS"], env["LISTEN_FDNAMES"])
	}
	if env["UPGRADER_GENERATION"] != "1" || env["UPGRADER_WORKER"] != "0" || env["NOTIFY_SOCKET"] == "" {
		t.Errorf("UPGRADER_GENERATION=%q UPGRADER_WORKER=%q NOTIFY_SOCKET=%q", env["UPGRADER_GENERATION"], env["UPGRADER_WORKER"], env["NOTIFY_SOCKET"])
	}
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	fds := map[string]string{}
	for _, e := range ents {
		fds[e.Name()], _ = os.Readlink(filepath.Join(dir, e.Name()))
	}
	if fds["0"] != "/dev/null" || !strings.HasPrefix(fds["3"], "socket:") || !strings.HasPrefix(fds["4"], "socket:") {
		t.Errorf("fds %v: want 0=/dev/null and sockets at 3 and 4", fds)
	}
	// The handoff channel comes right after the listeners.
	if env["UPGRADER_HANDOFF_FD"] != "5" || !strings.HasPrefix(fds["5"], "socket:") {
		t.Errorf("UPGRADER_HANDOFF_FD=%q, fd 5 %q; want the handoff socket at 5", env["UPGRADER_HANDOFF_FD"], fds["5"])
	}
	if len(fds) != 6 {
		t.Errorf("worker has fds %v; want only 0-2, the 2 listeners and the handoff channel", fds)
	}
}

// The "draining" progress of an upgrade counts the established connections
// the old generation holds: here three idle keep-alive connections.
func TestUpgradeProgressCountsConnections(t *testing.T) {
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--", helloBin)
	addr := p.addr("")
	p.waitReady(1)
	worker := p.workerPids(1)[0]
	for range 3 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		waitConsumed(t, c, worker)
	}
	progress, _ := p.upgrade(30 * time.Second)
	for _, ev := range progress {
		if ev.Event == "draining" {
			if ev.Old != 1 || ev.Connections != 3 {
				t.Fatalf("draining progress %+v, want generation 1 with 3 connections", ev)
			}
			return
		}
	}
	t.Fatalf("no draining progress in %+v", progress)
}
