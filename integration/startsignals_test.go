package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/supervise"
)

// startDelays are when a signal is sent, after upgrader's first
// startCPU of CPU time: through the packages' init, the command line, the
// listeners, to generation 1 starting and ready.
var startDelays = []time.Duration{0, 500 * time.Microsecond, time.Millisecond, 2 * time.Millisecond,
	3 * time.Millisecond, 5 * time.Millisecond, 8 * time.Millisecond, 10 * time.Millisecond,
	15 * time.Millisecond, 20 * time.Millisecond, 30 * time.Millisecond}

// startCPU is the CPU time after which upgrader can act on a signal. Up to
// the first package init that can catch one (internal/earlysig, after
// os/signal and what it imports), the kernel's and then the Go runtime's
// default actions apply, a window no code of upgrader's can close: about
// 3 ms of CPU from the exec (the kernel's exec, the runtime's start, the
// standard packages' init, Notify itself; earlysig's init end read its own
// /proc/self/schedstat at 2.8 to 3.6 ms, on a loaded machine), and any
// length of wall time on a loaded machine, so it is counted in CPU time.
const startCPU = 4500 * time.Microsecond

// plainUpgrader is upgrader built without the race detector, whose
// runtime takes milliseconds to start (its shadow memory) before Go's own
// signal handlers exist, a window a real build does not have and that no
// code of upgrader's can close.
var plainUpgrader = sync.OnceValues(func() (string, error) {
	bin := filepath.Join(filepath.Dir(upgraderBin), "upgrader-norace")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/upgrader")
	cmd.Dir, cmd.Stdout, cmd.Stderr = repoRoot, os.Stderr, os.Stderr
	return bin, cmd.Run()
})

// startSignalled starts upgrader (plainUpgrader) on hello and sends it
// sig delay after it has had startCPU of CPU time. The delay is the
// stimulus under test, not a wait on state.
func startSignalled(t *testing.T, sig syscall.Signal, delay time.Duration) *proc {
	t.Helper()
	bin, err := plainUpgrader()
	if err != nil {
		t.Fatalf("build upgrader without -race: %v", err)
	}
	dir := t.TempDir()
	control := filepath.Join(dir, "control.sock")
	cmd := exec.Command(bin, "run", "--log-format", "json", "--control", control, "-l", "127.0.0.1:0", "--", helloBin)
	cmd.Dir = dir
	p := startProc(t, cmd, control)
	waitCPU(t, p.pid, startCPU)
	time.Sleep(delay)
	p.signal(sig)
	return p
}

// waitCPU waits until pid's threads have run for cpu in all (the first
// field of /proc/PID/task/*/schedstat, in ns), reading as fast as it can:
// the first instants after count.
func waitCPU(t *testing.T, pid int, cpu time.Duration) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
		if err != nil || len(tasks) == 0 {
			t.Fatalf("upgrader pid %d: no threads (%v)", pid, err)
		}
		var ran time.Duration
		for _, path := range tasks {
			b, err := os.ReadFile(path)
			if err != nil {
				continue // a thread that has exited
			}
			if f := strings.Fields(string(b)); len(f) > 0 {
				ns, err := strconv.ParseInt(f[0], 10, 64)
				if err != nil {
					t.Fatalf("%s: %q: %v", path, b, err)
				}
				ran += time.Duration(ns)
			}
		}
		if ran >= cpu {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("upgrader pid %d ran %s of CPU in 10s, want %s", pid, ran, cpu)
		}
	}
}

// TestUpgradeSignalAtStartUpUpgrades: USR2 or HUP (systemctl reload) sent
// at any moment of upgrader's start-up is an upgrade asked for, never a
// death (SIGHUP's default action) nor a signal dropped: generation 2 comes
// once generation 1 is ready.
func TestUpgradeSignalAtStartUpUpgrades(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGUSR2, syscall.SIGHUP} {
		for _, d := range startDelays {
			t.Run(fmt.Sprintf("%s/%s", sigName(sig), d), func(t *testing.T) {
				p := startSignalled(t, sig, d)
				p.waitStatus(10*time.Second, "generation 2 ready", func(st supervise.Status) bool {
					return generationReady(st, 2)
				})
				if code := p.stop(syscall.SIGTERM, 30*time.Second); code != 0 {
					t.Fatalf("upgrader exited %d on SIGTERM, want 0", code)
				}
			})
		}
	}
}

// TestStopSignalAtStartUpStopsGracefully: SIGTERM at any moment of
// upgrader's start-up is a graceful stop (exit 0, after the stop was
// logged as such), never the Go runtime's default death (exit 143).
func TestStopSignalAtStartUpStopsGracefully(t *testing.T) {
	for _, d := range startDelays {
		t.Run(d.String(), func(t *testing.T) {
			p := startSignalled(t, syscall.SIGTERM, d)
			if code := p.wait(30 * time.Second); code != 0 {
				t.Fatalf("upgrader exited %d on a SIGTERM %s after its start, want 0 (a graceful stop)", code, d)
			}
			p.expectLogged(time.Second, "the graceful stop", func(e map[string]any) bool {
				return e["signal"] == "SIGTERM" && e["level"] == "info"
			})
		})
	}
}

func sigName(sig syscall.Signal) string {
	switch sig {
	case syscall.SIGUSR2:
		return "USR2"
	case syscall.SIGHUP:
		return "HUP"
	case syscall.SIGTERM:
		return "TERM"
	}
	return fmt.Sprint(int(sig))
}
