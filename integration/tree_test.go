package integration

import (
	"fmt"
	"math/rand/v2"
	"net"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/internal/proctree"
	"github.com/seed6cb0314a/upgrader/supervise"
)

// marked lists the processes whose environment holds mark, which a test
// puts in upgrader's environment: every process upgrader started, directly
// or not, inherits it, whatever group or session it moved to.
func marked(mark string) map[int]map[string]string {
	k, v, _ := strings.Cut(mark, "=")
	out := map[int]map[string]string{}
	tab, _ := proctree.Read("/proc")
	for pid, p := range tab {
		if p.State == 'Z' {
			continue // a zombie holds nothing
		}
		if env := proctree.Environ("/proc", pid); env[k] == v {
			out[pid] = env
		}
	}
	return out
}

func newMark() string { return fmt.Sprintf("UPGRADER_TEST_MARK=%x", rand.Uint64()) }

// killMarked stops, at the end of a test, whatever it left behind.
func killMarked(t *testing.T, mark string) {
	t.Cleanup(func() {
		for pid := range marked(mark) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
}

// requireNothingLeft fails when a process upgrader started is still there,
// or when addr cannot be bound again at once.
func requireNothingLeft(t *testing.T, mark, addr string) {
	t.Helper()
	if left := marked(mark); len(left) > 0 {
		var desc []string
		for pid, env := range left {
			desc = append(desc, fmt.Sprintf("pid %d (generation %s)", pid, env["UPGRADER_GENERATION"]))
		}
		t.Fatalf("processes upgrader started outlive it: %s", strings.Join(desc, ", "))
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("the listener's port is still held after upgrader exited: %v", err)
	}
	l.Close()
}

// Workers whose process trees misbehave: a helper in the background, a
// daemonised grandchild in a session of its own, a start script that does
// not exec its server. Old generations leave nothing behind at an
// upgrade, and nothing is left once upgrader has stopped.
func TestWorkerProcessTreesEndWithTheirWorker(t *testing.T) {
	for _, tc := range []struct{ name, body string }{
		{"background child", "sleep 3600 &\nexec " + helloBin},
		{"daemonised grandchild", "setsid -f sleep 3600\nexec " + helloBin},
		// The server's own shell sets LISTEN_PID to the pid the server
		// will have, as sd_listen_fds(3) requires, but the script waits.
		{"script that does not exec", "sh -c 'LISTEN_PID=$$; export LISTEN_PID; exec " + helloBin + "'"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mark := newMark()
			killMarked(t, mark)
			script := filepath.Join(t.TempDir(), "run")
			writeScript(t, script, tc.body)
			p := startUpgraderEnv(t, []string{mark}, "-l", "127.0.0.1:0", "--", script)
			addr := p.addr("")
			p.waitReady(1)
			p.upgradeTo(2)
			p.upgradeTo(3)
			// Generations 1 and 2 are gone from the status only once their
			// whole trees are: nothing of theirs may still run.
			for pid, env := range marked(mark) {
				if pid != p.pid && env["UPGRADER_GENERATION"] != "3" {
					t.Fatalf("pid %d of generation %s still runs after generation 3 took over", pid, env["UPGRADER_GENERATION"])
				}
			}
			if code := p.stop(syscall.SIGTERM, 30*time.Second); code != 0 {
				t.Fatalf("graceful stop exited %d", code)
			}
			requireNothingLeft(t, mark, addr)
		})
	}
}

// Giving up on a crashing worker that leaves processes behind: upgrader
// exits 1 and takes them with it.
func TestGiveUpLeavesNothingBehind(t *testing.T) {
	mark := newMark()
	killMarked(t, mark)
	script := filepath.Join(t.TempDir(), "run")
	writeScript(t, script, "sleep 3600 &\nsetsid -f sleep 3600\nexit 1")
	p := startUpgraderEnv(t, []string{mark}, "-l", "127.0.0.1:0", "--max-restarts", "1", "--", script)
	addr := p.addr("")
	if code := p.wait(30 * time.Second); code != 1 {
		t.Fatalf("upgrader exited %d after giving up, want 1", code)
	}
	requireNothingLeft(t, mark, addr)
}

// /readyz tells the truth: 503 once no worker of the current generation is
// alive, and "gave up" after giving up, until the exit.
func TestReadyzWithNoWorkerAliveAndAfterGivingUp(t *testing.T) {
	script := filepath.Join(t.TempDir(), "run")
	writeScript(t, script, "exec "+helloBin)
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--health", "127.0.0.1:0", "--max-restarts", "1", "--", script)
	p.waitReady(1)
	health := "http://" + p.healthAddr() + "/readyz"
	if code, body, err := get(health); err != nil || code != 200 {
		t.Fatalf("/readyz with a ready worker: %d %q %v", code, body, err)
	}
	// The next worker started fails at once; kill the only one.
	writeScript(t, script, "exit 1")
	victim := p.workerPids(1)[0]
	syscall.Kill(victim, syscall.SIGKILL)
	p.waitStatus(10*time.Second, "the killed worker gone", func(st supervise.Status) bool {
		g := genOf(st, 1)
		return st.GaveUp || g == nil || len(g.Workers) == 0 || g.Workers[0].Pid != victim
	})
	sawGaveUp := false
	for deadline := time.Now().Add(30 * time.Second); ; {
		if time.Now().After(deadline) {
			t.Fatal("upgrader still answers /readyz 30s after its worker could not be replaced")
		}
		code, body, err := get(health)
		if err != nil {
			break // upgrader has exited after its linger
		}
		if code != 503 {
			t.Fatalf("/readyz %d %q with no worker alive", code, body)
		}
		if strings.Contains(body, "gave up") {
			sawGaveUp = true
		}
		time.Sleep(20 * time.Millisecond) // probe interval
	}
	if !sawGaveUp {
		t.Fatal(`/readyz never answered "gave up" before upgrader exited`)
	}
	if code := p.wait(10 * time.Second); code != 1 {
		t.Fatalf("exit %d after giving up, want 1", code)
	}
}

// TERM while generation 1 is starting is a clean stop.
func TestStopWhileStartingExitsZero(t *testing.T) {
	script := filepath.Join(t.TempDir(), "run")
	writeScript(t, script, "exec sleep 3600") // never ready
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--", script)
	p.waitStatus(10*time.Second, "generation 1 starting", func(st supervise.Status) bool {
		g := genOf(st, 1)
		return g != nil && len(g.Workers) == 1
	})
	if code := p.stop(syscall.SIGTERM, 30*time.Second); code != 0 {
		t.Fatalf("TERM while starting: exit %d, want 0", code)
	}
}
