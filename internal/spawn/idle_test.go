package spawn

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// chainPy starts idle, says "idle", and once told starts a chain of
// threads, each started by the one before, faster than a pass of Unidle
// over a hundred threads goes; it says "100" at the hundredth and "done"
// at the last, then holds them all until stdin closes.
const chainPy = `
import os, sys, threading
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
print("idle", flush=True)
sys.stdin.readline()
hold, done, left = threading.Event(), threading.Event(), [400]
def link():
    left[0] -= 1
    if left[0] == 300:
        print("100", flush=True)
    if left[0] > 0:
        threading.Thread(target=link, daemon=True).start()
    else:
        done.set()
    hold.wait()
threading.Thread(target=link, daemon=True).start()
done.wait()
print("done", flush=True)
sys.stdin.readline()
`

// Threads that idle threads start while Unidle runs are moved too: a
// chain of threads, each started by the newest, is under way when Unidle
// is called, and once the chain is over none of its threads is idle. A
// single pass, which lists the threads once, leaves the rest of the chain
// idle (each started by a thread still idle when it was listed).
func TestUnidleThreadsStartedMeanwhile(t *testing.T) {
	if !CanUnidle() {
		t.Fatal("needs CAP_SYS_NICE or an RLIMIT_NICE of 20 (run as root, as .ci/run does)")
	}
	cmd := exec.Command("python3", "-c", chainPy)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		cmd.Wait()
	})
	lines := bufio.NewScanner(out)
	expect := func(want string) {
		t.Helper()
		if !lines.Scan() || lines.Text() != want {
			t.Fatalf("chain: got %q (%v), want %q", lines.Text(), lines.Err(), want)
		}
	}
	pid := cmd.Process.Pid
	expect("idle")
	if _, err := stdin.Write([]byte("\n")); err != nil {
		t.Fatal(err)
	}
	expect("100")
	if err := Unidle("/proc", pid); err != nil {
		t.Fatalf("Unidle: %v", err)
	}
	expect("done")
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	var idle []string
	for _, e := range ents {
		tid, _ := strconv.Atoi(e.Name())
		if p, _, _ := unix.RawSyscall(unix.SYS_SCHED_GETSCHEDULER, uintptr(tid), 0, 0); p == unix.SCHED_IDLE {
			idle = append(idle, e.Name())
		}
	}
	if len(ents) < 401 || len(idle) > 0 {
		t.Fatalf("after Unidle, %d of %d threads still idle: %s", len(idle), len(ents), strings.Join(idle[:min(len(idle), 10)], " "))
	}
}

// Workers start idle only from a supervisor under SCHED_OTHER, the policy
// they are given back: from one under SCHED_BATCH they would come back
// under another policy than the first generation's.
func TestCanStartIdlePolicy(t *testing.T) {
	if !CanUnidle() {
		t.Fatal("needs CAP_SYS_NICE or an RLIMIT_NICE of 20 (run as root, as .ci/run does)")
	}
	// other, batch: CanStartIdle under each; setup: setting SCHED_BATCH.
	var other, batch, setup error
	done := make(chan struct{})
	go func() {
		defer close(done)
		// Never unlocked: the thread, whose policy this changes, ends
		// with the goroutine.
		runtime.LockOSThread()
		other = CanStartIdle()
		attr, err := unix.SchedGetAttr(0, 0)
		if err == nil {
			attr.Policy = unix.SCHED_BATCH
			err = unix.SchedSetAttr(0, attr, 0)
		}
		if err != nil {
			setup = err
			return
		}
		batch = CanStartIdle()
	}()
	<-done
	if setup != nil {
		t.Fatalf("setting SCHED_BATCH: %v", setup)
	}
	if other != nil {
		t.Errorf("under SCHED_OTHER: %v", other)
	}
	if batch == nil || !strings.Contains(batch.Error(), "SCHED_BATCH") {
		t.Errorf("under SCHED_BATCH: %v, want an error that names it", batch)
	}
}
