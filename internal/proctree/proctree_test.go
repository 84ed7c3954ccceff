package proctree

import (
	"bytes"
	"errors"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestParseStat(t *testing.T) {
	p, err := ParseStat([]byte("4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 0"))
	if err != nil || p != (Proc{Pid: 4242, PPid: 1, Pgid: 4242, Sid: 4242, State: 'S'}) {
		t.Fatalf("ParseStat = %+v, %v", p, err)
	}
	for _, bad := range []string{"", "12 (x", "x (y) S 1 2 3", "12 (y) S 1 2", "12 (y) SS 1 2 3"} {
		if _, err := ParseStat([]byte(bad)); err == nil {
			t.Errorf("ParseStat(%q) accepted", bad)
		}
	}
}

// A real child and grandchild are found below this process, and the
// grandchild's environment is readable.
func TestReadFindsDescendants(t *testing.T) {
	cmd := exec.Command("sh", "-c", "sleep 30 & wait")
	cmd.Env = append(os.Environ(), "PROCTREE_MARK=1")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer cmd.Process.Kill()
	for {
		tab, err := Read("/proc")
		if err != nil {
			t.Fatal(err)
		}
		d := tab.Descendants(os.Getpid())
		if !slices.Contains(d, cmd.Process.Pid) {
			t.Fatalf("child %d not among descendants %v", cmd.Process.Pid, d)
		}
		if len(tab.Descendants(cmd.Process.Pid)) == 1 {
			gc := tab.Descendants(cmd.Process.Pid)[0]
			if Environ("/proc", gc)["PROCTREE_MARK"] != "1" {
				t.Fatalf("grandchild %d environment lacks PROCTREE_MARK", gc)
			}
			if tab[gc].Pgid != tab[cmd.Process.Pid].Pgid {
				t.Fatalf("grandchild group %d, want its parent's %d", tab[gc].Pgid, tab[cmd.Process.Pid].Pgid)
			}
			return
		}
	}
}

func TestTCPAddr(t *testing.T) {
	for in, want := range map[string]string{
		"0100007F:1F90":                         "127.0.0.1:8080",
		"00000000000000000000000001000000:0050": "[::1]:80",
	} {
		if got := TCPAddr(in); got != want {
			t.Errorf("TCPAddr(%q) = %q, want %q", in, got, want)
		}
	}
}

// This process's own listener is found by its inode, at its fd.
func TestTCPSocketsFindsOwnListener(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	f, err := l.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	inodes := SocketInodes("/proc", os.Getpid())
	got := TCPSockets("/proc", os.Getpid(), TCPListen, inodes)
	for in, addr := range got {
		if addr == l.Addr().String() && inodes[in] > 2 {
			return
		}
	}
	t.Fatalf("listener %s not among %v", l.Addr(), got)
}

// Read dates a process by its start: a child started between two clock
// readings is dated between them, within stat's tick.
func TestReadDatesAProcessByItsStart(t *testing.T) {
	before := time.Now()
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	after := time.Now()
	defer cmd.Wait()
	defer cmd.Process.Kill()
	tab, err := Read("/proc")
	if err != nil {
		t.Fatal(err)
	}
	p, ok := tab[cmd.Process.Pid]
	if !ok || p.StartTicks == 0 {
		t.Fatalf("child %d: %+v, found %v", cmd.Process.Pid, p, ok)
	}
	slack := 2 * clockTick
	if p.Started.Before(before.Add(-slack)) || p.Started.After(after.Add(slack)) {
		t.Fatalf("child started at %s, dated %s, outside [%s, %s]", before.Format(time.RFC3339Nano),
			p.Started.Format(time.RFC3339Nano), before.Format(time.RFC3339Nano), after.Format(time.RFC3339Nano))
	}
}

// ChildrenOf lists this process's children, a zombie among them, and
// nothing of another's; a pid that is gone is an error.
func TestChildrenOfListsOwnChildren(t *testing.T) {
	live := exec.Command("sleep", "30")
	dead := exec.Command("true")
	for _, c := range []*exec.Cmd{live, dead} {
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
	}
	defer live.Wait()
	defer live.Process.Kill()
	defer dead.Wait() // reaped only after the checks: a zombie till then
	kids, err := ChildrenOf("/proc", os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []*exec.Cmd{live, dead} {
		if !slices.Contains(kids, c.Process.Pid) {
			t.Errorf("child %d (%s) not in ChildrenOf = %v", c.Process.Pid, c.Path, kids)
		}
	}
	if kids, err := ChildrenOf("/proc", live.Process.Pid); err != nil || len(kids) != 0 {
		t.Errorf("ChildrenOf(sleep) = %v, %v; want none", kids, err)
	}
	if _, err := ChildrenOf(t.TempDir(), os.Getpid()); err == nil {
		t.Error("ChildrenOf of a root without the pid: no error")
	}
}

// readFile grows its buffer past its capacity, reads a file whole, and
// says fs.ErrNotExist for a file that is not there.
func TestReadFileWhole(t *testing.T) {
	p := t.TempDir() + "/f"
	want := bytes.Repeat([]byte("0123456789"), 1000)
	if err := os.WriteFile(p, want, 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := readFile(p, make([]byte, 0, 16))
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("readFile(%s) = %d bytes, %v; want the %d written", p, len(got), err, len(want))
	}
	if got, err := readFile("/proc/self/stat", nil); err != nil || len(got) == 0 {
		t.Fatalf("readFile(/proc/self/stat) = %q, %v", got, err)
	}
	if _, err := readFile(p+"-missing", nil); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("readFile of a missing file: %v, want fs.ErrNotExist", err)
	}
}

// HoldsFile finds a socket of ours at the fd a child got it at, and not
// one the child never got, nor one at an fd past the limit; a child gone
// is an error, not a "no".
func TestHoldsFile(t *testing.T) {
	given, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer given.Close()
	other, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	gf, _ := given.(*net.TCPListener).File()
	defer gf.Close()
	of, _ := other.(*net.TCPListener).File()
	defer of.Close()
	// The child's fd 3 is /dev/null, the listener its fd 9.
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	cmd := exec.Command("sleep", "30")
	cmd.ExtraFiles = []*os.File{devnull, devnull, devnull, devnull, devnull, devnull, gf}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	for _, c := range []struct {
		ours  []int
		limit int
		want  bool
	}{
		{[]int{int(gf.Fd())}, 64, true},
		{[]int{int(of.Fd()), int(gf.Fd())}, 64, true},
		{[]int{int(of.Fd())}, 64, false},
		{[]int{int(gf.Fd())}, 9, false},
	} {
		found, err := HoldsFile(pid, c.ours, c.limit)
		if err != nil || found != c.want {
			t.Errorf("HoldsFile(%d, %v, %d) = %v, %v; want %v", pid, c.ours, c.limit, found, err, c.want)
		}
	}
	cmd.Process.Kill()
	cmd.Wait()
	if found, err := HoldsFile(pid, []int{int(gf.Fd())}, 64); err == nil {
		t.Errorf("HoldsFile of exited pid %d = %v, no error", pid, found)
	}
}

// ChildrenOfThreads lists the children of the thread that forked them,
// once for a thread named twice, and none for a thread that forked none.
func TestChildrenOfThreads(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	tid := unix.Gettid()
	// Forked from this thread: its parent, as the children files tell.
	pid, err := syscall.ForkExec("/bin/sleep", []string{"sleep", "30"}, &syscall.ProcAttr{})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		syscall.Kill(pid, syscall.SIGKILL)
		var ws syscall.WaitStatus
		syscall.Wait4(pid, &ws, 0, nil)
	}()
	kids, err := ChildrenOfThreads("/proc", os.Getpid(), []int{tid, tid})
	if err != nil || len(kids) != 1 || kids[0] != pid {
		t.Errorf("ChildrenOfThreads(self, forking thread twice) = %v, %v; want [%d]", kids, err, pid)
	}
	if kids, err := ChildrenOfThreads("/proc", pid, []int{pid}); err != nil || len(kids) != 0 {
		t.Errorf("ChildrenOfThreads(sleep) = %v, %v; want none", kids, err)
	}
	if _, err := ChildrenOfThreads("/proc", os.Getpid(), []int{1 << 30}); err == nil {
		t.Error("ChildrenOfThreads of a thread that is not there: no error")
	}
}

// BenchmarkHoldsFile times the check that a child holds a listener of
// ours (supervise's holdsListener) both ways, on a child with a dozen
// fds, the listener at its 10th: kcmp(2) until the match, and the read of
// its fd table. Both are warm after the first run; the first read of a
// new process's /proc/PID/fd also makes its dentries.
//
//	go test -run '^$' -bench HoldsFile ./internal/proctree
func BenchmarkHoldsFile(b *testing.B) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	f, _ := l.(*net.TCPListener).File()
	defer f.Close()
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		b.Fatal(err)
	}
	defer devnull.Close()
	cmd := exec.Command("sleep", "30")
	cmd.ExtraFiles = []*os.File{devnull, devnull, devnull, devnull, devnull, devnull, f, devnull, devnull}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	pid, ours := cmd.Process.Pid, []int{int(f.Fd())}
	st, _ := f.Stat()
	inode := strconv.FormatUint(st.Sys().(*syscall.Stat_t).Ino, 10)
	b.Run("kcmp", func(b *testing.B) {
		for b.Loop() {
			if found, err := HoldsFile(pid, ours, 64); !found || err != nil {
				b.Fatalf("HoldsFile: %v, %v", found, err)
			}
		}
	})
	b.Run("fd-table", func(b *testing.B) {
		for b.Loop() {
			socks, err := Sockets("/proc", pid)
			if _, ok := socks[inode]; !ok || err != nil {
				b.Fatalf("Sockets: %v, %v", socks, err)
			}
		}
	})
}
