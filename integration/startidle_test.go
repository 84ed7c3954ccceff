package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/seed6cb0314a/upgrader/internal/spawn"
)

// TestUpgradeStartsIdle: the workers of an upgrade start under SCHED_IDLE
// (--start-idle, on by default when upgrader may undo it: with
// CAP_SYS_NICE, as root here; without, never),
// every thread and child they make inherits it, and at READY=1 upgrader
// gives all of them the usual policy back; the first generation starts
// as usual. The worker, in Python, writes the policy it and a child of its
// own had before its READY=1; the test reads the policies after it.
func TestUpgradeStartsIdle(t *testing.T) {
	out := filepath.Join(t.TempDir(), "policies")
	py := fmt.Sprintf(`
import os, socket, time
gen = os.environ["UPGRADER_GENERATION"]
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
with open(%q, "a") as o:
    o.write("gen=%%s worker=%%d child=%%d\n" %% (gen, os.sched_getscheduler(0), os.sched_getscheduler(child)))
with open(%q + "." + gen, "w") as o:
    o.write(str(child))
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(os.environ["NOTIFY_SOCKET"])
s.send(b"READY=1")
time.sleep(60)`, out, out)
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--ready-hold", "0", "--", "python3", "-c", py)
	p.waitReady(1)
	p.signal(syscall.SIGUSR2)
	p.waitReady(2)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	// SCHED_OTHER is 0, SCHED_IDLE 5 (sched.h). Where upgrader could not
	// undo SCHED_IDLE (no CAP_SYS_NICE: this test has upgrader's
	// credentials) it must not have used it.
	want := "gen=1 worker=0 child=0\ngen=2 worker=5 child=5\n"
	if !spawn.CanUnidle() {
		want = "gen=1 worker=0 child=0\ngen=2 worker=0 child=0\n"
	}
	if string(b) != want {
		t.Fatalf("policies before READY=1:\n%s\nwant:\n%s", b, want)
	}
	worker := p.workerPids(2)[0]
	cb, err := os.ReadFile(out + ".2")
	if err != nil {
		t.Fatal(err)
	}
	for _, pid := range []string{fmt.Sprint(worker), strings.TrimSpace(string(cb))} {
		tasks, err := os.ReadDir("/proc/" + pid + "/task")
		if err != nil {
			t.Fatal(err)
		}
		for _, task := range tasks {
			if pol := schedPolicy(t, pid, task.Name()); pol != 0 {
				t.Errorf("pid %s thread %s: policy %d once ready, want 0 (SCHED_OTHER)", pid, task.Name(), pol)
			}
		}
	}
}

// schedPolicy reads a thread's policy: field 41 of /proc/PID/task/TID/stat
// (proc(5)), counted after the command's closing parenthesis.
func schedPolicy(t *testing.T, pid, tid string) int {
	t.Helper()
	b, err := os.ReadFile("/proc/" + pid + "/task/" + tid + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	var pol int
	fmt.Sscan(f[41-3], &pol)
	return pol
}

// TestUpgradeKeepsBatchPolicy: under SCHED_BATCH (systemd's
// CPUSchedulingPolicy=batch), upgrader does not start workers idle, since
// it could only give them SCHED_OTHER back: every thread of the first
// generation's worker and of the upgrade's runs under SCHED_BATCH, as
// upgrader does.
func TestUpgradeKeepsBatchPolicy(t *testing.T) {
	dir := t.TempDir()
	control := filepath.Join(dir, "control.sock")
	cmd := exec.Command("chrt", "--batch", "0", upgraderBin, "run", "--log-format", "json", "--log-level", "debug",
		"--control", control, "-l", "127.0.0.1:0", "--ready-hold", "0", "--", helloBin)
	cmd.Dir = dir
	p := startProc(t, cmd, control)
	for gen := 1; gen <= 2; gen++ {
		if gen == 2 {
			p.signal(syscall.SIGUSR2)
		}
		p.waitReady(gen)
		for _, pid := range append([]int{p.pid}, p.workerPids(gen)...) {
			tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
			if err != nil {
				t.Fatal(err)
			}
			for _, task := range tasks {
				if pol := schedPolicy(t, fmt.Sprint(pid), task.Name()); pol != 3 { // SCHED_BATCH
					t.Errorf("generation %d: pid %d thread %s under policy %d, want 3 (SCHED_BATCH)", gen, pid, task.Name(), pol)
				}
			}
		}
	}
}
