package inherit

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
)

// The test binary re-executes itself as a socket-activated child: fd 3 is
// a listener, LISTEN_FDS/LISTEN_FDNAMES are set, and the child sets
// LISTEN_PID to itself, as upgrader's shim does.
func TestMain(m *testing.M) {
	if os.Getenv("INHERIT_TEST_CHILD") == "listeners" {
		listenersChild()
		os.Exit(0)
	}
	if mode := os.Getenv("INHERIT_TEST_CHILD"); mode != "" {
		os.Setenv("LISTEN_PID", fmt.Sprint(os.Getpid()))
		s, err := New()
		if err != nil {
			fmt.Println("error:", err)
			os.Exit(0)
		}
		l, err := s.Listen("web", "tcp", "127.0.0.1:0")
		if err != nil {
			fmt.Println("error:", err)
			os.Exit(0)
		}
		fmt.Printf("names=%s addr=%s env=%s\n", strings.Join(s.Names(), ","), l.Addr(), os.Getenv("LISTEN_FDS"))
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// listenersChild takes every inherited stream listener, then binds a fresh
// one through the ListenConfig given, and says what it got.
func listenersChild() {
	os.Setenv("LISTEN_PID", fmt.Sprint(os.Getpid()))
	var controlled bool
	lc := net.ListenConfig{Control: func(string, string, syscall.RawConn) error { controlled = true; return nil }}
	s, err := New(WithListenConfig(lc))
	if err != nil {
		fmt.Println("error:", err)
		return
	}
	byName, err := s.Listeners()
	if err != nil {
		fmt.Println("error:", err)
		return
	}
	var out []string
	for name, ls := range byName {
		for _, l := range ls {
			out = append(out, fmt.Sprintf("%s=%s/%s/%v", name, l.Addr().Network(), l.Addr(), s.Inherited(l)))
		}
	}
	sort.Strings(out)
	l, err := s.Listen("", "tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println("error:", err)
		return
	}
	pc, err := s.ListenPacket("dns", "udp", "127.0.0.1:0")
	if err != nil {
		fmt.Println("error:", err)
		return
	}
	fmt.Printf("%s fresh=%v/%v packet=%s/%v\n", strings.Join(out, " "), s.Inherited(l), controlled, pc.LocalAddr(), s.Inherited(pc))
}

func child(t *testing.T, fds, names string, files ...*os.File) string {
	t.Helper()
	return childMode(t, "1", fds, names, files...)
}

func childMode(t *testing.T, mode, fds, names string, files ...*os.File) string {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "INHERIT_TEST_CHILD="+mode, "LISTEN_FDS="+fds, "LISTEN_FDNAMES="+names)
	cmd.ExtraFiles = files
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(out))
}

func TestListenTakesInheritedListenerByName(t *testing.T) {
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
	got := child(t, "1", "web", f)
	want := fmt.Sprintf("names=web addr=%s env=", l.Addr())
	if got != want {
		t.Fatalf("child said %q, want %q (the inherited listener, variables unset)", got, want)
	}
	// Another name is not taken: the child binds fresh.
	if got := child(t, "1", "other", f); strings.Contains(got, l.Addr().String()) || strings.HasPrefix(got, "error") {
		t.Fatalf("child took a listener of another name: %q", got)
	}
}

func TestNewRejectsLISTEN_FDSBeyondOpenFds(t *testing.T) {
	got := child(t, "3", "a:b:c")
	if !strings.Contains(got, "LISTEN_FDS=3") || !strings.Contains(got, "fd 3") {
		t.Fatalf("child said %q, want an error naming LISTEN_FDS and the fd", got)
	}
}

// TestNewRejectsLISTEN_FDNAMESNotOnePerFd: a LISTEN_FDNAMES with more or
// fewer names than LISTEN_FDS is refused, as sd_listen_fds_with_names(3)
// refuses it (EINVAL), with an error naming both variables: which name
// goes with which fd is a guess, and a worker asking for "web" could get
// another listener.
func TestNewRejectsLISTEN_FDNAMESNotOnePerFd(t *testing.T) {
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
	for _, names := range []string{"web:admin", "web:admin:dns", "a:"} {
		got := child(t, "1", names, f)
		if !strings.HasPrefix(got, "error:") || !strings.Contains(got, "LISTEN_FDNAMES=") || !strings.Contains(got, "LISTEN_FDS=1") {
			t.Errorf("LISTEN_FDS=1 LISTEN_FDNAMES=%s: child said %q, want an error naming LISTEN_FDNAMES and LISTEN_FDS", names, got)
		}
	}
}

// Listeners takes every inherited stream listener by
// name and no datagram socket; Inherited tells inherited from fresh; a
// fresh bind goes through the ListenConfig given.
func TestListenersTakesEveryStreamListener(t *testing.T) {
	tcp1, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tcp1.Close()
	tcp2, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tcp2.Close()
	unixPath := filepath.Join(t.TempDir(), "s")
	ul, err := net.Listen("unix", unixPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ul.Close()
	udp, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	var files []*os.File
	for _, c := range []interface{ File() (*os.File, error) }{tcp1.(*net.TCPListener), udp.(*net.UDPConn), ul.(*net.UnixListener), tcp2.(*net.TCPListener)} {
		f, err := c.File()
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		files = append(files, f)
	}
	got := childMode(t, "listeners", "4", "web:dns:admin:web", files...)
	want := []string{
		"admin=unix/" + unixPath + "/true",
		"web=tcp/" + tcp1.Addr().String() + "/true",
		"web=tcp/" + tcp2.Addr().String() + "/true",
	}
	sort.Strings(want)
	wantLine := fmt.Sprintf("%s fresh=false/true packet=%s/true", strings.Join(want, " "), udp.LocalAddr())
	if got != wantLine {
		t.Fatalf("child said\n%q\nwant\n%q", got, wantLine)
	}
}
