package supervise

import (
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// startChild forks sh running script, a real child of this process.
func startChild(t *testing.T, script string) int {
	t.Helper()
	pid, err := syscall.ForkExec("/bin/sh", []string{"sh", "-c", script}, &syscall.ProcAttr{Env: os.Environ()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Kill(pid, unix.SIGKILL); unix.Wait4(pid, nil, unix.WNOHANG, nil) })
	return pid
}

// waitExited polls peekExit until pid has exited.
func waitExited(t *testing.T, pid int) unix.WaitStatus {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) { // polling interval
		got, ws, err := peekExit(pid)
		if err != nil {
			t.Fatalf("peekExit(%d): %v", pid, err)
		}
		if got == pid {
			return ws
		}
	}
	t.Fatalf("child %d did not exit", pid)
	return 0
}

// peekExit tells an exit as wait4 does, status included, and leaves the
// child a zombie until reapPid posts it and reaps it.
func TestPeekExitThenReap(t *testing.T) {
	for _, tc := range []struct {
		script string
		kill   syscall.Signal
		want   string
	}{
		{script: "exit 3", want: "exited 3"},
		{script: "exec sleep 60", kill: unix.SIGKILL, want: "signaled killed"},
		{script: "exec sleep 60", kill: unix.SIGTERM, want: "signaled terminated"},
	} {
		t.Run(tc.want, func(t *testing.T) {
			pid := startChild(t, tc.script)
			if tc.kill != 0 {
				unix.Kill(pid, tc.kill)
			}
			describe := func(ws unix.WaitStatus) string {
				switch {
				case ws.Exited():
					return fmt.Sprintf("exited %d", ws.ExitStatus())
				case ws.Signaled():
					return "signaled " + ws.Signal().String()
				}
				return fmt.Sprintf("status %#x", uint32(ws))
			}
			if got := describe(waitExited(t, pid)); got != tc.want {
				t.Fatalf("peekExit: %s; want %s", got, tc.want)
			}
			stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
			if err != nil || !strings.Contains(string(stat), ") Z ") {
				t.Fatalf("after peekExit the child is not a zombie: %q, %v", stat, err)
			}
			var posted []evExit
			if !reapPid(pid, func(e event) { posted = append(posted, e.(evExit)) }) {
				t.Fatal("reapPid: not reaped")
			}
			if len(posted) != 1 || posted[0].pid != pid || describe(posted[0].status) != tc.want {
				t.Fatalf("reapPid posted %+v; want one exit of %d, %s", posted, pid, tc.want)
			}
			if _, err := unix.Wait4(pid, nil, unix.WNOHANG, nil); err != unix.ECHILD {
				t.Fatalf("after reapPid, wait4(%d): %v; want ECHILD (reaped)", pid, err)
			}
		})
	}
}
