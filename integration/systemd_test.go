package integration

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestSystemdUnitsVerify runs systemd-analyze verify on the packaged units,
// with the binaries they name replaced by the ones built for the tests.
func TestSystemdUnitsVerify(t *testing.T) {
	units, err := filepath.Glob(filepath.Join(repoRoot, "packaging", "systemd", "*"))
	if err != nil || len(units) == 0 {
		t.Fatalf("no units in packaging/systemd: %v", err)
	}
	verifyUnits(t, units, upgraderBin, helloBin)
}

// Where the units in packaging/systemd/ find the binaries: the paths the
// Debian package installs them at (packaging/nfpm.yaml).
const (
	unitUpgraderPath = "/usr/bin/upgrader"
	unitHelloPath    = "/usr/lib/upgrader/hello"
)

// verifyUnits runs systemd-analyze verify on copies of units in which the
// packaged upgrader and hello paths name upgrader and hello instead, and
// fails on any complaint (systemd-analyze also checks that they are
// executables). It skips the test when systemd-analyze is missing.
func verifyUnits(t *testing.T, units []string, upgrader, hello string) {
	t.Helper()
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Skip("systemd-analyze not installed (Debian package systemd; scripts/deps installs it): not verifying packaging/systemd")
	}
	dir := t.TempDir()
	var paths []string
	for _, u := range units {
		b, err := os.ReadFile(u)
		if err != nil {
			t.Fatal(err)
		}
		b = bytes.ReplaceAll(b, []byte(unitUpgraderPath), []byte(upgrader))
		b = bytes.ReplaceAll(b, []byte(unitHelloPath), []byte(hello))
		p := filepath.Join(dir, filepath.Base(u))
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	out, err := exec.Command("systemd-analyze", append([]string{"verify"}, paths...)...).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify %s: %v\n%s", strings.Join(paths, " "), err, out)
	}
}

// notifyMsg is one datagram received on a fake NOTIFY_SOCKET.
type notifyMsg struct {
	text string
	fds  []int
}

// fakeNotifySocket listens where a service manager would and collects what
// upgrader sends, fds included.
type fakeNotifySocket struct {
	path string
	fd   int
	mu   sync.Mutex
	msgs []notifyMsg
}

func newFakeNotifySocket(t *testing.T) *fakeNotifySocket {
	t.Helper()
	dir, err := os.MkdirTemp("", "sdn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	s := &fakeNotifySocket{path: filepath.Join(dir, "notify")}
	if s.fd, err = unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(s.fd, &unix.SockaddrUnix{Name: s.path}); err != nil {
		t.Fatal(err)
	}
	// Poll with a receive timeout so that the reader ends with the test.
	unix.SetsockoptTimeval(s.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 50000})
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		buf, oob := make([]byte, 4096), make([]byte, unix.CmsgSpace(4*16))
		for {
			select {
			case <-done:
				return
			default:
			}
			n, oobn, _, _, err := unix.Recvmsg(s.fd, buf, oob, unix.MSG_CMSG_CLOEXEC)
			if err != nil {
				continue
			}
			m := notifyMsg{text: string(buf[:n])}
			if cms, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, cm := range cms {
					if fds, err := unix.ParseUnixRights(&cm); err == nil {
						m.fds = append(m.fds, fds...)
					}
				}
			}
			s.mu.Lock()
			s.msgs = append(s.msgs, m)
			s.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		close(done)
		<-stopped
		unix.Close(s.fd)
		for _, m := range s.msgs {
			for _, fd := range m.fds {
				unix.Close(fd)
			}
		}
	})
	return s
}

// find returns the first message with every line of want, waiting up to
// timeout for it.
func (s *fakeNotifySocket) find(t *testing.T, timeout time.Duration, want ...string) notifyMsg {
	t.Helper()
	for deadline := time.Now().Add(timeout); ; {
		s.mu.Lock()
		for _, m := range s.msgs {
			lines := strings.Split(m.text, "\n")
			ok := true
			for _, w := range want {
				found := false
				for _, l := range lines {
					found = found || l == w
				}
				ok = ok && found
			}
			if ok {
				s.mu.Unlock()
				return m
			}
		}
		var got []string
		for _, m := range s.msgs {
			got = append(got, strconv.Quote(m.text))
		}
		s.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatalf("no notify message with %q within %s; got %s", want, timeout, strings.Join(got, ", "))
		}
		time.Sleep(10 * time.Millisecond) // polling interval
	}
}

// listeningAddr returns the address fd is listening on, or fails.
func listeningAddr(t *testing.T, fd int) string {
	t.Helper()
	if acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || acc != 1 {
		t.Fatalf("fd %d is not a listening socket (SO_ACCEPTCONN %d, %v)", fd, acc, err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	a, ok := sa.(*unix.SockaddrInet4)
	if !ok {
		t.Fatalf("fd %d is bound to %T, want an IPv4 address", fd, sa)
	}
	return net.JoinHostPort(net.IP(a.Addr[:]).String(), strconv.Itoa(a.Port))
}

// TestSystemdFDStoreKeepsListeners: under a service manager's notify
// socket, upgrader sends each --listen socket with FDSTORE=1 and its name.
func TestSystemdFDStoreKeepsListeners(t *testing.T) {
	ns := newFakeNotifySocket(t)
	p := startUpgraderEnv(t, []string{"NOTIFY_SOCKET=" + ns.path},
		"--listen", "web=127.0.0.1:0", "--", helloBin)
	addr := p.addr("web")
	m := ns.find(t, 10*time.Second, "FDSTORE=1", "FDNAME=web")
	if len(m.fds) != 1 {
		t.Fatalf("FDSTORE=1 message %q carries %d fds, want 1", m.text, len(m.fds))
	}
	if got := listeningAddr(t, m.fds[0]); got != addr {
		t.Fatalf("stored fd listens on %s; upgrader's listener web is on %s", got, addr)
	}
	// It is upgrader's listener itself, not a copy bound alike.
	var st unix.Stat_t
	if err := unix.Fstat(m.fds[0], &st); err != nil {
		t.Fatal(err)
	}
	if _, held := socketInodes(p.pid)[strconv.FormatUint(st.Ino, 10)]; !held {
		t.Fatalf("stored fd (socket inode %d) is not a socket upgrader holds", st.Ino)
	}
	ns.find(t, 10*time.Second, "READY=1")
}

// startActivated runs upgrader with files as fds 3, 4, … and LISTEN_FDS,
// LISTEN_FDNAMES and LISTEN_PID (its own pid, set by a shell that then
// execs it) as systemd passes its fd store back.
func startActivated(t *testing.T, files []*os.File, names []string, args ...string) *proc {
	t.Helper()
	dir := t.TempDir()
	ctl := filepath.Join(dir, "control.sock")
	cmd := exec.Command("/bin/sh", append([]string{"-c", `LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"`,
		upgraderBin, "run", "--log-format", "json", "--log-level", "debug", "--control", ctl}, args...)...)
	cmd.Dir, cmd.ExtraFiles = dir, files
	cmd.Env = append(os.Environ(), "LISTEN_FDS="+strconv.Itoa(len(files)), "LISTEN_FDNAMES="+strings.Join(names, ":"), "NOTIFY_SOCKET=")
	return startProc(t, cmd, ctl)
}

// boundListener binds a loopback listener for the test to pass on, and
// returns it, a file of its fd (both closed at the test's end) and the
// socket's stat, whose inode names the socket in /proc.
func boundListener(t *testing.T) (net.Listener, *os.File, unix.Stat_t) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	f, err := l.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return l, f, st
}

// TestSystemdAdoptsStoredListener: an inherited socket named as a --listen
// value, bound to its address, is adopted instead of bound anew: the
// worker serves on the very socket the test bound, which the test still
// holds (so a new bind to that address would fail with EADDRINUSE).
func TestSystemdAdoptsStoredListener(t *testing.T) {
	l, f, st := boundListener(t)
	addr := l.Addr().String()
	p := startActivated(t, []*os.File{f}, []string{"web"}, "--listen", "web="+addr, "--", helloBin)
	p.waitReady(1)
	s := p.status()
	if len(s.Listeners) != 1 || s.Listeners[0].Name != "web" || s.Listeners[0].Address != addr || s.Listeners[0].FD != 3 {
		t.Fatalf("listeners %+v; want web on %s at worker fd 3, once", s.Listeners, addr)
	}
	if _, held := socketInodes(p.pid)[strconv.FormatUint(st.Ino, 10)]; !held {
		t.Fatalf("upgrader does not hold the socket the test passed (inode %d): it bound another", st.Ino)
	}
	worker := p.workerPids(1)[0]
	if _, held := socketInodes(worker)[strconv.FormatUint(st.Ino, 10)]; !held {
		t.Fatalf("worker %d does not hold the test's socket (inode %d)", worker, st.Ino)
	}
	if code, body, err := get("http://" + addr + "/"); err != nil || code != 200 {
		t.Fatalf("GET on the adopted socket: %d %q %v", code, body, err)
	}
	if out, code := runCLI(t, "upgrade", "--control", p.control); code != 0 {
		t.Fatalf("upgrade with an adopted listener: %s", out)
	}
}

// TestSystemdInheritedNameMismatchBindsAnew: an inherited socket with a
// --listen name but another address (the unit's address changed while the
// fd store kept the old socket) is not adopted: the --listen address is
// bound anew, and upgrader lets the old socket go.
func TestSystemdInheritedNameMismatchBindsAnew(t *testing.T) {
	old, f, st := boundListener(t)
	want := freePort(t) // another port of 127.0.0.1
	p := startActivated(t, []*os.File{f}, []string{"web"}, "--listen", "web="+want, "--", helloBin)
	p.waitReady(1)
	s := p.status()
	if len(s.Listeners) != 1 || s.Listeners[0].Name != "web" || s.Listeners[0].Address != want {
		t.Fatalf("listeners %+v; want web on %s only", s.Listeners, want)
	}
	if _, held := socketInodes(p.pid)[strconv.FormatUint(st.Ino, 10)]; held {
		t.Fatalf("upgrader still holds the inherited socket on %s that --listen web=%s does not match", old.Addr(), want)
	}
	if code, _, err := get("http://" + want + "/"); err != nil || code != 200 {
		t.Fatalf("GET on web: %d %v", code, err)
	}
}
