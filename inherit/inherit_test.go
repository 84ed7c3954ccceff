package inherit

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// The test binary re-executes itself as a socket-activated child: fd 3 is
// a listener, LISTEN_FDS/LISTEN_FDNAMES are set, and the child sets
// LISTEN_PID to itself, as upgrader's shim does.
func TestMain(m *testing.M) {
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

func child(t *testing.T, fds, names string, files ...*os.File) string {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "INHERIT_TEST_CHILD=1", "LISTEN_FDS="+fds, "LISTEN_FDNAMES="+names)
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
