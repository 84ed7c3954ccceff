package spawn

import (
	"bufio"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/proctree"
)

func TestMain(m *testing.M) {
	RunShimIfRequested()
	// As upgrader does: what go test leaked to us must not reach the
	// commands, whose fds the tests count.
	if err := CloseOnExecFrom(3); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}

// reporter prints, one per line, what a command was given: its pid,
// LISTEN_PID, its scheduling policy (sched(7)), the slots of its fd table
// (FDSize, proc(5)) and its open fds (ls -l /proc/PID/fd: the shell's
// own, not ls's).
const reporter = `echo pid $$; echo LISTEN_PID $LISTEN_PID; sed -n 's/^policy *: */policy /p' /proc/$$/sched; sed -n 's/^FDSize:[[:space:]]*/fdsize /p' /proc/$$/status; ls -l /proc/$$/fd | sed -n 's/.* \([0-9]*\) -> \(.*\)/fd \1 \2/p'`

type reported struct {
	pid, listenPid string
	policy, fdSize int
	fds            map[int]string
}

// run starts reporter through s, with files as its fds 2 and up (its
// stdout a pipe of ours), and returns its pid and what it reported.
func run(t *testing.T, s *Spawner, idle bool, env []string, files ...int) (int, reported) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	spec := Spec{Path: "/bin/sh", Args: []string{"sh", "-c", reporter}, Env: append([]string{"LISTEN_PID=0", "PATH=/usr/bin:/bin"}, env...),
		Files: append([]int{int(devnull.Fd()), int(w.Fd())}, files...), Pdeathsig: syscall.SIGTERM, Idle: idle}
	pid, err := s.Start(spec)
	w.Close()
	if err != nil {
		t.Fatal(err)
	}
	got := reported{fds: map[int]string{}}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.SplitN(sc.Text(), " ", 3)
		switch f[0] {
		case "pid":
			got.pid = f[1]
		case "LISTEN_PID":
			got.listenPid = f[1]
		case "policy":
			got.policy, _ = strconv.Atoi(f[1])
		case "fdsize":
			got.fdSize, _ = strconv.Atoi(f[1])
		case "fd":
			fd, _ := strconv.Atoi(f[1])
			got.fds[fd] = f[2]
		}
	}
	var ws unix.WaitStatus
	if _, err := unix.Wait4(pid, &ws, 0, nil); err != nil || ws.ExitStatus() != 0 {
		t.Fatalf("command %d: %v, status %v", pid, err, ws)
	}
	return pid, got
}

// waitWaiting waits until every spare of s is in recvmsg(2), waiting for
// its request (/proc/PID/syscall), and returns their pids.
func waitWaiting(t *testing.T, s *Spawner, n int) []int {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		pids := s.SparePids()
		waiting := len(pids) == n
		for _, pid := range pids {
			data, _ := os.ReadFile(fmt.Sprintf("/proc/%d/syscall", pid))
			if f := strings.Fields(string(data)); len(f) == 0 || f[0] != strconv.Itoa(unix.SYS_RECVMSG) {
				waiting = false
			}
		}
		if waiting {
			return pids
		}
	}
	t.Fatalf("spares %v: not %d waiting after 10s", s.SparePids(), n)
	return nil
}

func newSpawner(t *testing.T) *Spawner {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	s := NewSpawner(self, nil)
	t.Cleanup(s.Close)
	return s
}

// The spare and the shim give a command the same process: its own pid in
// LISTEN_PID, Files in place (a repeated fd twice, the -1 slots closed,
// stderr among them, or /dev/null), and no other fd.
func TestSpareStartsAsTheShimDoes(t *testing.T) {
	sock, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(sock)
	for _, spare := range []bool{false, true} {
		t.Run(fmt.Sprintf("spare=%v", spare), func(t *testing.T) {
			s := newSpawner(t)
			var sparePid int
			if spare {
				s.Prestart(SpareSpec{Pdeathsig: syscall.SIGTERM, FDTable: 1024}, 1)
				sparePid = waitWaiting(t, s, 1)[0]
			}
			pid, got := run(t, s, false, nil, -1, sock, -1, sock)
			if spare && pid != sparePid {
				t.Errorf("command pid %d, spare %d", pid, sparePid)
			}
			if got.pid != strconv.Itoa(pid) || got.listenPid != got.pid {
				t.Errorf("pid %d: reported pid %s, LISTEN_PID %s", pid, got.pid, got.listenPid)
			}
			target, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", sock))
			want := map[int]string{0: "/dev/null", 3: target, 5: target}
			for fd, w := range want {
				if got.fds[fd] != w {
					t.Errorf("fd %d: %q, want %q", fd, got.fds[fd], w)
				}
			}
			// A Go program that starts with fd 0, 1 or 2 closed opens
			// /dev/null there (the runtime's checkfds): the shim does.
			if t2, open := got.fds[2]; open && t2 != "/dev/null" {
				t.Errorf("fd 2 (%s) open in the command", t2)
			}
			for fd := range got.fds {
				if fd > 5 || fd == 4 {
					t.Errorf("fd %d (%s) open in the command", fd, got.fds[fd])
				}
			}
			if spare && len(s.SparePids()) != 0 {
				t.Errorf("spare %v still listed after it was taken", s.SparePids())
			}
		})
	}
}

// A spare grows its fd table to SpareSpec.FDTable before it waits, and
// the command it becomes has that table (execve(2) keeps it); without, the
// command has the table a fork leaves, as through a shim.
func TestSpareGrowsFDTable(t *testing.T) {
	for _, table := range []int{0, 16384} {
		s := newSpawner(t)
		s.Prestart(SpareSpec{Pdeathsig: syscall.SIGTERM, FDTable: table}, 1)
		waitWaiting(t, s, 1)
		_, got := run(t, s, false, nil)
		if table > 0 && got.fdSize < table || table == 0 && got.fdSize >= 1024 {
			t.Errorf("FDTable %d: the command's FDSize is %d", table, got.fdSize)
		}
	}
}

// A spare started idle waits, once started, with the usual policy; the
// command it becomes runs under SCHED_IDLE only if asked.
func TestSpareIdlePolicy(t *testing.T) {
	if !CanUnidle() {
		t.Fatal("needs CAP_SYS_NICE or an RLIMIT_NICE of 20 (run as root, as .ci/run does)")
	}
	s := newSpawner(t)
	for _, idle := range []bool{false, true} {
		s.Prestart(SpareSpec{Pdeathsig: syscall.SIGTERM, Idle: true}, 1)
		pid := waitWaiting(t, s, 1)[0]
		ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range ents {
			tid, _ := strconv.Atoi(e.Name())
			if p, _, _ := unix.RawSyscall(unix.SYS_SCHED_GETSCHEDULER, uintptr(tid), 0, 0); p != unix.SCHED_NORMAL {
				t.Errorf("spare %d thread %d waits under policy %d", pid, tid, p)
			}
		}
		want := unix.SCHED_NORMAL
		if idle {
			want = unix.SCHED_IDLE
		}
		if _, got := run(t, s, idle, nil, 2); got.policy != want {
			t.Errorf("Idle %v: command's policy %d, want %d", idle, got.policy, want)
		}
	}
}

// A spare that died is reaped, and the command started through a shim of
// its own; a request too large for a spare's one read leaves the spare
// waiting.
func TestSpareGoneOrTooSmall(t *testing.T) {
	s := newSpawner(t)
	dead := killedSpare(t, s)
	pid, got := run(t, s, false, nil, 2)
	if pid == dead || got.listenPid != strconv.Itoa(pid) {
		t.Errorf("command pid %d (LISTEN_PID %s) after spare %d died", pid, got.listenPid, dead)
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", dead)); err == nil {
		t.Errorf("dead spare %d not reaped", dead)
	}

	s.Prestart(SpareSpec{Pdeathsig: syscall.SIGTERM}, 1)
	spare := waitWaiting(t, s, 1)[0]
	big := "BIG=" + strings.Repeat("x", 70<<10)
	pid, got = run(t, s, false, []string{big}, 2)
	if pid == spare || got.listenPid != strconv.Itoa(pid) {
		t.Errorf("a 70 KiB request went to spare %d (command %d)", spare, pid)
	}
	if !slices.Equal(s.SparePids(), []int{spare}) {
		t.Errorf("spares %v after a request too large, want [%d]", s.SparePids(), spare)
	}
}

// Close ends and reaps the spares; Prestart starts none after it.
func TestSpareClose(t *testing.T) {
	s := newSpawner(t)
	s.Prestart(SpareSpec{Pdeathsig: syscall.SIGTERM}, 2)
	pids := waitWaiting(t, s, 2)
	s.Close()
	for _, pid := range pids {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
			t.Errorf("spare %d still there after Close", pid)
		}
	}
	s.Prestart(SpareSpec{Pdeathsig: syscall.SIGTERM}, 1)
	if p := s.SparePids(); len(p) != 0 {
		t.Errorf("spares %v started after Close", p)
	}
}

// A spare that died while waiting is replaced, and reaped, at the next
// Prestart.
func TestSpareDeadIsReplaced(t *testing.T) {
	s := newSpawner(t)
	dead := killedSpare(t, s)
	s.Prestart(SpareSpec{Pdeathsig: syscall.SIGTERM}, 1)
	if got := waitWaiting(t, s, 1)[0]; got == dead {
		t.Fatalf("dead spare %d kept", dead)
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", dead)); err == nil {
		t.Errorf("dead spare %d not reaped", dead)
	}
}

// killedSpare starts a spare of s, kills it once it waits, and returns
// its pid once it has exited, its end of the socket closed with its last
// thread, and before anything reaps it.
func killedSpare(t *testing.T, s *Spawner) int {
	t.Helper()
	s.Prestart(SpareSpec{Pdeathsig: syscall.SIGTERM}, 1)
	pid := waitWaiting(t, s, 1)[0]
	if err := unix.Kill(pid, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitExited(t, pid)
	return pid
}

// waitExited waits until pid, a child of ours, has exited, its last
// thread with it (waitid(2) WNOWAIT: it is left to be reaped).
func waitExited(t *testing.T, pid int) {
	t.Helper()
	for {
		var info unix.Siginfo
		if err := unix.Waitid(unix.P_PID, pid, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil); err != nil {
			t.Fatal(err)
		}
		if info.Signo == int32(unix.SIGCHLD) {
			return
		}
		time.Sleep(time.Millisecond) // polling interval
	}
}

// Every child of a Spawner, a spare's and a shim's command alike, is a
// child of its ForkingThread, as the children files tell.
func TestForkingThreadIsTheParent(t *testing.T) {
	s := newSpawner(t)
	s.Prestart(SpareSpec{Pdeathsig: syscall.SIGTERM}, 1)
	spare := waitWaiting(t, s, 1)[0]
	kids, err := proctree.ChildrenOfThreads("/proc", os.Getpid(), []int{s.ForkingThread()})
	if err != nil || !slices.Contains(kids, spare) {
		t.Errorf("children of the forking thread %d: %v, %v; want spare %d among them", s.ForkingThread(), kids, err, spare)
	}
}
