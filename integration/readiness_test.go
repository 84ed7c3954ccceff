package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
	"github.com/seed6cb0314a/upgrader/supervise"
)

// notifyReady is the Python that sends READY=1 on NOTIFY_SOCKET.
const notifyReady = `
def notify_ready():
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(os.environ["NOTIFY_SOCKET"])
        s.sendall(b"READY=1")
`

// refusedUpgrade upgrades p, serving generation 1 from helloBin under
// load, to a version written as the Python program body, and checks that
// the upgrade to generation 2 failed with a reason holding want while
// generation 1, its workers untouched and never drained, served every
// request.
func refusedUpgrade(t *testing.T, body, want string, args ...string) {
	t.Helper()
	p, script, addr := startScripted(t, "exec "+helloBin, args...)
	g1 := p.workerPids(1)
	l := startLoad(loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.NewConn})
	l.waitServed(t, 1, 50)
	py := filepath.Join(t.TempDir(), "worker.py")
	if err := os.WriteFile(py, []byte("import os, socket, time\n"+notifyReady+body), 0o644); err != nil {
		t.Fatal(err)
	}
	writeScript(t, script, "exec python3 "+py)
	p.signal(syscall.SIGUSR2)
	st := p.waitStatus(15*time.Second, "upgrade to generation 2 over", func(st supervise.Status) bool {
		return st.LastUpgrade != nil && st.LastUpgrade.Generation == 2
	})
	if st.LastUpgrade.OK || !strings.Contains(st.LastUpgrade.Reason, want) {
		t.Fatalf("upgrade %+v; want it failed with %q", st.LastUpgrade, want)
	}
	if g := genOf(st, 1); st.Current != 1 || g == nil || g.State != supervise.GenActive ||
		fmt.Sprint(p.workerPids(1)) != fmt.Sprint(g1) {
		t.Fatalf("after the refused upgrade: generation %d current, generation 1 %+v; want generation 1 active with workers %v", st.Current, g, g1)
	}
	l.waitServed(t, 1, 50) // generation 1 still takes new connections
	requireNoFailures(t, l.stop())
}

// A new version that says READY=1 and crashes 100 ms later is caught by
// the ready hold (the default): generation 1 is never drained, and the
// load sees no failure. The worker takes no connection of its own, so
// every one of them waits in the shared accept queue for generation 1.
func TestReadyThenCrashRollsBack(t *testing.T) {
	refusedUpgrade(t, "notify_ready()\ntime.sleep(0.1)\nos._exit(3)\n", "within the ready hold")
}

// A new version that closes its inherited listener, then says READY=1,
// is not ready: it could not take a connection.
func TestClosedListenerIsNotReady(t *testing.T) {
	refusedUpgrade(t, "os.close(3)\nnotify_ready()\ntime.sleep(60)\n", "holds none of the listeners")
}

// A server whose main process gave its listener to a child of its own,
// and closed its own copy (a master and its workers), is ready: its tree
// holds the listener. The child says READY=1 only once the main process
// has closed fd 3.
func TestListenerHeldByChildIsReady(t *testing.T) {
	p, script, _ := startScripted(t, "exec "+helloBin)
	py := filepath.Join(t.TempDir(), "worker.py")
	body := `
r, w = os.pipe()
if os.fork() == 0:
    os.close(w)
    os.read(r, 1)
    notify_ready()
    time.sleep(60)
    os._exit(0)
os.close(r)
os.close(3)
os.write(w, b"x")
time.sleep(60)
`
	if err := os.WriteFile(py, []byte("import os, socket, time\n"+notifyReady+body), 0o644); err != nil {
		t.Fatal(err)
	}
	writeScript(t, script, "exec python3 "+py)
	p.signal(syscall.SIGUSR2)
	st := p.waitStatus(15*time.Second, "upgrade to generation 2 over", func(st supervise.Status) bool {
		return st.LastUpgrade != nil && st.LastUpgrade.Generation == 2
	})
	if !st.LastUpgrade.OK || st.Current != 2 {
		t.Fatalf("upgrade %+v, generation %d current; want generation 2 ready, its child holding the listener", st.LastUpgrade, st.Current)
	}
}
