package integration

import (
	"fmt"
	"io"
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
)

// upgradeUnderLoad runs n upgrades by USR2 under load, interval apart, and
// returns the load's result once generation n+1 is serving. Each USR2 is
// sent once the previous upgrade is ready: one sent earlier would be queued
// and coalesced with the next (as specified), which a slow starter under
// load makes likely.
func upgradeUnderLoad(t *testing.T, p *proc, cfg loadgen.Config, n int, interval time.Duration) loadgen.Result {
	t.Helper()
	p.waitReady(1)
	stop := runLoad(cfg)
	for i := 0; i < n; i++ {
		time.Sleep(interval)
		p.signal(syscall.SIGUSR2)
		p.waitReady(i + 2)
	}
	time.Sleep(200 * time.Millisecond) // let the newest generation serve some
	return stop()
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
	if r.ClosedUnderClient != 0 {
		t.Fatalf("%d connections were closed under their client", r.ClosedUnderClient)
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
	done := make(chan reply, 1)
	go func() {
		resp, err := http.Post("http://"+addr+"/?sleep=3s", "text/plain", strings.NewReader("x"))
		if err != nil {
			done <- reply{err: err}
			return
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		done <- reply{code: resp.StatusCode, gen: resp.Header.Get("X-Generation")}
	}()
	time.Sleep(500 * time.Millisecond)
	p.signal(syscall.SIGUSR2)
	p.waitReady(2)
	p.waitLog(5*time.Second, "generation 1 draining", msg("draining generation", "generation", 1))
	r := <-done
	if r.err != nil || r.code != 200 || r.gen != "1" {
		t.Fatalf("in-flight request: code %d, generation %q, err %v; want 200 from generation 1", r.code, r.gen, r.err)
	}
	p.waitLog(10*time.Second, "generation 1 exited", msg("generation exited", "generation", 1))
}

func TestFailedUpgradesKeepOldGenerationServing(t *testing.T) {
	p, script, addr := startScripted(t, "exec "+helloBin, "--ready-timeout", "2s")
	stop := runLoad(loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.NewConn})

	// A version that exits 1 at start.
	writeScript(t, script, "echo 'cannot start: bad config' >&2; exit 1")
	p.signal(syscall.SIGUSR2)
	f := p.waitLog(10*time.Second, "generation 2 failed", msg("generation failed", "generation", 2))
	if reason := f["reason"].(string); !strings.Contains(reason, "exited with status 1 before it was ready") {
		t.Errorf("failure reason %q does not say the worker exited 1 before ready", reason)
	}

	// A version that serves on the shared listener but never says READY=1:
	// it is stopped by the drain signal, so what it accepted still completes.
	writeScript(t, script, "exec env -u NOTIFY_SOCKET "+helloBin)
	p.signal(syscall.SIGUSR2)
	f = p.waitLog(10*time.Second, "generation 3 failed", msg("generation failed", "generation", 3))
	if reason := f["reason"].(string); !strings.Contains(reason, "not ready within 2s") {
		t.Errorf("failure reason %q does not name the ready timeout", reason)
	}
	p.waitLog(10*time.Second, "generation 3 exited", msg("generation exited", "generation", 3))
	time.Sleep(300 * time.Millisecond)
	r := stop()
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
	p.waitLog(5*time.Second, "generation 2 starting", msg("starting generation", "generation", 2))
	p.signal(syscall.SIGUSR2)
	p.signal(syscall.SIGUSR2)
	p.waitReady(2)
	p.waitReady(3)
	time.Sleep(1500 * time.Millisecond)
	if p.hasLog(msg("starting generation", "generation", 4)) {
		t.Fatal("two USR2s during an upgrade queued more than one upgrade")
	}
}

func TestPythonAndNodeWorkersUpgradeUnderLoad(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"python", []string{"--", "python3", filepath.Join(repoRoot, "examples/python/worker.py")}},
		{"node", []string{"--ready", "fd:4", "--", "node", filepath.Join(repoRoot, "examples/node/server.js")}},
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
	upgrade := func(gen int) {
		p.signal(syscall.SIGUSR2)
		p.waitReady(gen)
		p.waitLog(30*time.Second, fmt.Sprintf("generation %d exited", gen-1), msg("generation exited", "generation", gen-1))
	}
	upgrade(2)
	first := countFDs(t, p.pid)
	for gen := 3; gen <= 101; gen++ {
		upgrade(gen)
	}
	if after := countFDs(t, p.pid); after != first {
		t.Fatalf("supervisor has %d fds after 100 upgrades, %d after the first", after, first)
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
	started := p.waitLog(time.Second, "worker started", msg("worker started", "generation", 1))
	pid := int(started["pid"].(float64))
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
