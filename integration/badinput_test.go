package integration

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/supervise"
)

func TestBadInputIsNamed(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	for _, tc := range []struct {
		name string
		args []string
		code int
		want []string
	}{
		{"unparsable listen", []string{"-l", "tcpx://127.0.0.1:80", "--", helloBin}, 2, []string{`--listen "tcpx://127.0.0.1:80"`, "unknown scheme"}},
		{"listen without port", []string{"-l", "127.0.0.1", "--", helloBin}, 2, []string{`--listen "127.0.0.1"`, "HOST:PORT"}},
		{"port in use", []string{"-l", busy.Addr().String(), "--", helloBin}, 1, []string{busy.Addr().String(), "address already in use"}},
		{"missing command", []string{"-l", "127.0.0.1:0", "--", "/nonexistent/server"}, 1, []string{`COMMAND "/nonexistent/server"`}},
		{"bad ready mode", []string{"-l", "127.0.0.1:0", "--ready", "fd:1", "--", helloBin}, 2, []string{`--ready "fd:1"`}},
		{"ready fd on a listener", []string{"-l", "127.0.0.1:0", "--ready", "fd:3", "--", helloBin}, 2, []string{"--ready fd:3", "listeners at fds 3 to 3"}},
		{"bad drain signal", []string{"-l", "127.0.0.1:0", "--drain-signal", "TERMINATE", "--", helloBin}, 2, []string{`signal "TERMINATE"`}},
		{"no command", []string{"-l", "127.0.0.1:0"}, 2, []string{"no COMMAND"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := startUpgrader(t, tc.args...)
			if code := p.wait(10 * time.Second); code != tc.code {
				t.Errorf("exit code %d, want %d", code, tc.code)
			}
			out := p.tail(20)
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("error output does not name %q:\n%s", w, out)
				}
			}
		})
	}
}

func TestNotifyMessagesAreChecked(t *testing.T) {
	// The worker (python, exec'd by the shim, so its pid is the worker's)
	// first sends a malformed message, then a good READY=1.
	py := `import os, socket, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(os.environ["NOTIFY_SOCKET"])
s.send(b"READY")
time.sleep(0.1)
s.send(b"STATUS=up\nREADY=1\n")
time.sleep(60)`
	p := startUpgrader(t, "--", "python3", "-c", py)
	// READY=1 came after the malformed message on the same socket: once
	// ready, that one has been handled, and what is logged about it names
	// the line.
	p.waitReady(1)
	p.expectLogged(2*time.Second, "an error naming the malformed line", func(m map[string]any) bool {
		e, _ := m["error"].(string)
		return strings.Contains(e, `"READY"`) && strings.Contains(e, "KEY=VALUE")
	})
	pid := p.workerPids(1)[0]

	// A process that is not a worker (this test) is dropped and named.
	c, err := net.Dial("unixgram", environ(t, pid)["NOTIFY_SOCKET"])
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("STOPPING=1")); err != nil {
		t.Fatal(err)
	}
	p.expectLogged(10*time.Second, fmt.Sprintf("the foreign message, naming its sender pid %d", os.Getpid()), func(m map[string]any) bool {
		return m["pid"] == float64(os.Getpid())
	})
	// A negative check over a fixed short window: the foreign STOPPING=1
	// was not acted on, the worker is neither replaced nor draining.
	for start := time.Now(); time.Since(start) < 300*time.Millisecond; time.Sleep(20 * time.Millisecond) {
		g := genOf(p.status(), 1)
		if g == nil || len(g.Workers) != 1 || g.Workers[0].Pid != pid || g.Workers[0].State != supervise.WorkerReady {
			t.Fatalf("a foreign STOPPING=1 was acted on: generation 1 %+v", g)
		}
	}
}

func TestFDStorePassesFdsToLaterGenerations(t *testing.T) {
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	out := filepath.Join(dir, "out")
	// Generation 1 stores an open file as "db"; generation 2 finds it after
	// the listener, reads it, and removes it; generation 3 has no fd store.
	py := fmt.Sprintf(`import os, socket, time, array
gen = os.environ["UPGRADER_GENERATION"]
names = os.environ.get("LISTEN_FDNAMES", "")
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(os.environ["NOTIFY_SOCKET"])
with open(%q, "a") as o:
    o.write(f"gen={gen} fds={os.environ.get('LISTEN_FDS')} names={names}")
    if gen == "1":
        fd = os.open(%q, os.O_RDWR | os.O_CREAT)
        os.write(fd, b"stored by generation 1")
        s.sendmsg([b"FDSTORE=1\nFDNAME=db"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    if gen == "2":
        o.write(" read=" + os.pread(4, 100, 0).decode())
        s.send(b"FDSTOREREMOVE=1\nFDNAME=db")
    o.write("\n")
s.send(b"READY=1")
time.sleep(60)`, out, data)
	p := startUpgrader(t, "-l", "web=127.0.0.1:0", "--", "python3", "-c", py)
	p.waitReady(1)
	p.waitStatus(5*time.Second, `fd "db" kept`, func(st supervise.Status) bool { return slices.Contains(st.FDStore, "db") })
	p.signal(syscall.SIGUSR2)
	p.waitReady(2)
	p.waitStatus(5*time.Second, `fd "db" removed`, func(st supervise.Status) bool { return len(st.FDStore) == 0 })
	p.signal(syscall.SIGUSR2)
	p.waitReady(3)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	want := "gen=1 fds=1 names=web\ngen=2 fds=2 names=web:db read=stored by generation 1\ngen=3 fds=1 names=web\n"
	if string(b) != want {
		t.Fatalf("workers saw:\n%s\nwant:\n%s", b, want)
	}
	if st := p.status(); len(st.FDStore) != 0 {
		t.Fatalf("fd store %v after FDSTOREREMOVE", st.FDStore)
	}
}

// TestNoListenersIsSaid: upgrader with no --listen and no socket
// activation runs its workers all the same (a worker may serve no socket,
// or keep its own in the fd store), but warns at the start: a worker that
// binds a port itself when it inherits none holds it against the next
// generation.
func TestNoListenersIsSaid(t *testing.T) {
	p := startUpgrader(t, "--ready", "delay:10ms", "--", "sleep", "100")
	p.waitReady(1)
	p.expectLogged(5*time.Second, "the warning that there are no listeners", func(e map[string]any) bool {
		return e["level"] == "warn" && e["listeners"] == float64(0)
	})
	if code := p.stop(syscall.SIGTERM, 30*time.Second); code != 0 {
		t.Fatalf("upgrader exited %d on SIGTERM, want 0", code)
	}
}
