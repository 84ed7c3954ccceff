package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/inherit"
	"github.com/seed6cb0314a/upgrader/internal/proctree"
)

// readPid waits until path holds a pid (a script writes it as it starts).
func readPid(t *testing.T, path string, timeout time.Duration) int {
	t.Helper()
	for deadline := time.Now().Add(timeout); ; time.Sleep(5 * time.Millisecond) {
		if b, err := os.ReadFile(path); err == nil && strings.HasSuffix(string(b), "\n") {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				return pid
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no pid in %s within %s", path, timeout)
		}
	}
}

// waitChild waits for the child tableflip starts below parent: the one
// that has exec'd with the upgrade's generation in its environment. Not
// any child: before its first process start the Go runtime forks one that
// exits at once (package os's check that clone(CLONE_PIDFD) works), and
// a test that took that one for the new process waited on nothing.
func waitChild(t *testing.T, parent int) int {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		for c, state := range children(t, parent) {
			if state != "Z" && proctree.Environ("/proc", c)[inherit.EmbeddedGenerationEnv] != "" {
				return c
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("no child process started on SIGUSR2")
		}
	}
}

// A new binary that never becomes ready and leaves processes of its own
// (one in the background, in its process group, one in a session of its
// own): once the upgrade timeout kills it, nothing it started is left.
func TestEmbedNeverReadyChildLeavesNoDescendants(t *testing.T) {
	e := startEmbedded(t, "-upgrade-timeout", "2s")
	parent := e.current()
	bg, sid := filepath.Join(e.dir, "bg.pid"), filepath.Join(e.dir, "sid.pid")
	writeScript(t, e.bin, fmt.Sprintf("sleep 1000 & echo $! > %s\nsetsid sleep 1001 & echo $! > %s\nexec sleep 999", bg, sid))
	syscall.Kill(parent, syscall.SIGUSR2)
	child := waitChild(t, parent)
	left := []int{readPid(t, bg, 10*time.Second), readPid(t, sid, 10*time.Second)}
	t.Cleanup(func() {
		for _, pid := range left {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	waitGone(t, child, 30*time.Second)
	for _, pid := range left {
		// Killed with the child, not later: a few milliseconds' grace for
		// the kernel to finish them.
		waitGone(t, pid, time.Second)
	}
	if p := e.current(); p != parent {
		t.Fatalf("PID file names %d, want the parent %d still", p, parent)
	}
	installBin(t, helloBin, e.bin)
	e.upgrade()
}

// A USR2 after the binary is fixed cancels the wait on the broken child
// started before (killed at once, with its tree) and upgrades to the fixed
// one, long before the broken child's timeout.
func TestEmbedUSR2AfterFixCancelsWaitOnBrokenChild(t *testing.T) {
	e := startEmbedded(t, "-upgrade-timeout", "60s")
	parent := e.current()
	bg := filepath.Join(e.dir, "bg.pid")
	writeScript(t, e.bin, fmt.Sprintf("sleep 1000 & echo $! > %s\nexec sleep 999", bg))
	syscall.Kill(parent, syscall.SIGUSR2)
	broken := waitChild(t, parent)
	left := readPid(t, bg, 10*time.Second)
	t.Cleanup(func() { syscall.Kill(left, syscall.SIGKILL) })
	installBin(t, helloBin, e.bin)
	syscall.Kill(parent, syscall.SIGUSR2)
	next := e.waitPid(parent, 15*time.Second)
	if _, alive := parentOf(broken); alive {
		t.Fatalf("the broken child %d still runs after the fixed binary took over", broken)
	}
	waitGone(t, left, time.Second)
	waitGone(t, parent, 30*time.Second)
	if p := e.current(); p != next {
		t.Fatalf("PID file names %d, want %d", p, next)
	}
}
