package integration

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
)

// embedded is examples/hello run in embedded mode (-upgrades): no
// upgrader, the process upgrades itself with tableflip on SIGUSR2.
type embedded struct {
	t   testing.TB
	dir string
	bin string // the binary tableflip re-executes: a test may replace it
	pid string // the PID file tableflip writes once a process is ready
	log string // every generation's stderr
	cmd *exec.Cmd
	// seen holds every pid that served, for the cleanup.
	seen map[int]bool
}

// startEmbedded runs a copy of hello with -upgrades and waits until it is
// ready (its pid in the PID file).
func startEmbedded(t testing.TB, args ...string) *embedded {
	t.Helper()
	return startFlip(t, helloBin, append([]string{"-upgrades"}, args...)...)
}

// startFlip runs a copy of src, a tableflip server taking -pid-file and
// -addr (hello -upgrades, or bareflip), and waits until it is ready.
func startFlip(t testing.TB, src string, args ...string) *embedded {
	t.Helper()
	dir := t.TempDir()
	e := &embedded{t: t, dir: dir, bin: filepath.Join(dir, "hello"), pid: filepath.Join(dir, "pid"),
		log: filepath.Join(dir, "log"), seen: map[int]bool{}}
	installBin(t, src, e.bin)
	logf, err := os.Create(e.log)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	argv := append([]string{"-pid-file", e.pid}, args...)
	if !hasFlag(args, "-addr") {
		argv = append(argv, "-addr", "127.0.0.1:0")
	}
	e.cmd = exec.Command(e.bin, argv...)
	e.cmd.Dir, e.cmd.Stdout, e.cmd.Stderr = dir, logf, logf
	e.start()
	e.waitPid(0, 30*time.Second)
	return e
}

// start starts e.cmd; at the test's end every process that served is
// killed, and on a failure the log of every generation is shown.
func (e *embedded) start() {
	t := e.t
	t.Helper()
	if err := e.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go e.cmd.Wait()
	t.Cleanup(func() {
		for pid := range e.seen {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		e.cmd.Process.Kill()
		if t.Failed() {
			b, _ := os.ReadFile(e.log)
			if len(b) > 20000 {
				b = b[len(b)-20000:]
			}
			t.Logf("log of every generation:\n%s", b)
		}
	})
}

func hasFlag(args []string, f string) bool {
	for _, a := range args {
		if a == f || strings.HasPrefix(a, f+"=") {
			return true
		}
	}
	return false
}

// current is the pid in the PID file (0 when none yet).
func (e *embedded) current() int {
	b, err := os.ReadFile(e.pid)
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return n
}

// waitPid waits until the PID file names a live process other than old,
// and returns it.
func (e *embedded) waitPid(old int, timeout time.Duration) int {
	e.t.Helper()
	for deadline := time.Now().Add(timeout); ; {
		if p := e.current(); p != 0 && p != old {
			if _, alive := parentOf(p); alive {
				e.seen[p] = true
				return p
			}
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("no new ready process (PID file %d, was %d) within %s", e.current(), old, timeout)
		}
		time.Sleep(5 * time.Millisecond) // polling interval
	}
}

// waitGone waits until pid has exited (or is a zombie, its exit done).
func waitGone(t testing.TB, pid int, timeout time.Duration) {
	t.Helper()
	for deadline := time.Now().Add(timeout); ; {
		if _, alive := parentOf(pid); !alive {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d still runs after %s", pid, timeout)
		}
		time.Sleep(5 * time.Millisecond) // polling interval
	}
}

// upgrade sends SIGUSR2 to the serving process and waits until its
// successor is ready and it has drained and exited; it returns the new pid.
func (e *embedded) upgrade() int {
	e.t.Helper()
	return e.upgradeOn(syscall.SIGUSR2)
}

// upgradeOn is upgrade with sig (SIGUSR2 or SIGHUP).
func (e *embedded) upgradeOn(sig syscall.Signal) int {
	e.t.Helper()
	old := e.current()
	if err := syscall.Kill(old, sig); err != nil {
		e.t.Fatal(err)
	}
	p := e.waitPid(old, 30*time.Second)
	waitGone(e.t, old, 30*time.Second)
	return p
}

func (e *embedded) logText() string {
	b, _ := os.ReadFile(e.log)
	return string(b)
}

// records parses every generation's log (hello logs with slog's
// TextHandler) into records of key=value attributes, level and msg
// included; lines that are not such records are left out.
func (e *embedded) records() []map[string]string {
	var recs []map[string]string
	for _, line := range strings.Split(e.logText(), "\n") {
		if r := parseLogfmt(line); r["level"] != "" {
			recs = append(recs, r)
		}
	}
	return recs
}

// parseLogfmt parses a line of key=value pairs, a value bare or quoted as
// slog's TextHandler quotes it; it returns nil for a line that is not one.
func parseLogfmt(line string) map[string]string {
	r := map[string]string{}
	for line = strings.TrimSpace(line); line != ""; line = strings.TrimLeft(line, " ") {
		key, rest, ok := strings.Cut(line, "=")
		if !ok || key == "" || strings.ContainsAny(key, " \"") {
			return nil
		}
		var value string
		if strings.HasPrefix(rest, `"`) {
			q, err := strconv.QuotedPrefix(rest)
			if err != nil {
				return nil
			}
			value, _ = strconv.Unquote(q)
			rest = rest[len(q):]
		} else {
			value, rest, _ = strings.Cut(rest, " ")
			rest = " " + rest
		}
		if rest != "" && rest[0] != ' ' {
			return nil
		}
		r[key] = value
		line = rest
	}
	return r
}

// runEmbeddedUpgrades upgrades n times, gap apart, under load, and returns
// what the load saw.
func runEmbeddedUpgrades(t testing.TB, e *embedded, addr string, mode loadgen.Mode, n int, gap time.Duration) loadgen.Result {
	t.Helper()
	l := startLoad(loadgen.Config{Addr: addr, Clients: 16, Mode: mode, MaxIdle: 50 * time.Millisecond})
	l.waitServed(t, 1, 100)
	for i := 0; i < n; i++ {
		time.Sleep(gap) // each process serves the load this long: the scenario's pace
		e.upgrade()
		l.waitServed(t, i+2, 10)
	}
	return l.stop()
}

// TestEmbedUpgradesNewConn: 20 embedded upgrades, 0.5 s apart, under 16
// clients opening a new connection per request: no request fails.
func TestEmbedUpgradesNewConn(t *testing.T) {
	e := startEmbedded(t)
	addr := waitListening(t, e.current())
	r := runEmbeddedUpgrades(t, e, addr, loadgen.NewConn, 20, 500*time.Millisecond)
	requireNoFailures(t, r)
	if len(r.Generations) < 21 {
		t.Fatalf("responses from %d generations, want 21: %v", len(r.Generations), r.Generations)
	}
}

// TestEmbedUpgradesKeepAlive: the same with keep-alive clients idling up to
// 50 ms between requests: no request fails, the server closes no
// connection, and connections are answered by several generations (handed
// off from process to process).
func TestEmbedUpgradesKeepAlive(t *testing.T) {
	e := startEmbedded(t)
	addr := waitListening(t, e.current())
	r := runEmbeddedUpgrades(t, e, addr, loadgen.KeepAlive, 20, 500*time.Millisecond)
	requireNoFailures(t, r)
	if r.ServerCloses != 0 || r.ClosedUnderClient != 0 || r.IdleClosed != 0 {
		t.Fatalf("connections closed by the server: %d with Connection: close, %d under the client, %d while idle; want none",
			r.ServerCloses, r.ClosedUnderClient, r.IdleClosed)
	}
	if r.ConnsAcrossGenerations == 0 || r.GenerationRegress != 0 {
		t.Fatalf("%d connections answered by several generations (want some), %d regressions (want none)",
			r.ConnsAcrossGenerations, r.GenerationRegress)
	}
}

// TestEmbedInFlightRequestCompletes: a 3 s request in flight at the
// upgrade is answered, by the old process, which exits only after it.
func TestEmbedInFlightRequestCompletes(t *testing.T) {
	e := startEmbedded(t)
	old := e.current()
	addr := waitListening(t, old)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, "GET /?sleep=3s HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	// Read by the old process, the request is in its handler: an active
	// connection, which is not handed off.
	waitConsumed(t, c, old)
	syscall.Kill(old, syscall.SIGUSR2)
	e.waitPid(old, 30*time.Second)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("the request in flight at the upgrade failed: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("X-Pid") != strconv.Itoa(old) {
		t.Fatalf("status %d from pid %s; want 200 from the old process %d", resp.StatusCode, resp.Header.Get("X-Pid"), old)
	}
	waitGone(t, old, 30*time.Second)
}

// failedUpgrade replaces the binary with script, upgrades under load, and
// checks that the parent keeps serving with no failed request, that the
// failed child is reaped, and that the parent logged an error naming the
// child and reason; then it puts the real binary back and upgrades for
// real.
func failedUpgrade(t *testing.T, script, reason string, args ...string) {
	e := startEmbedded(t, args...)
	parent := e.current()
	addr := waitListening(t, parent)
	l := startLoad(loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.KeepAlive, MaxIdle: 50 * time.Millisecond})
	l.waitServed(t, 1, 100)
	writeScript(t, e.bin, script)
	syscall.Kill(parent, syscall.SIGUSR2)
	// The upgrade is over once the child tableflip started has come and
	// gone (reaped: no zombie left). Every child seen counts: the first
	// os.StartProcess of a Go process also clones a child that exits at
	// once (os.checkPidfd's CLONE_PIDFD probe), and a CI run took that one
	// for the failed upgrade.
	seen := map[int]bool{}
	for deadline := time.Now().Add(10 * time.Second); len(seen) == 0; time.Sleep(time.Millisecond) {
		for c := range children(t, parent) {
			seen[c] = true
		}
		if time.Now().After(deadline) {
			t.Fatal("no child process started on SIGUSR2")
		}
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		left := 0
		for c := range children(t, parent) {
			seen[c] = true
			left++
		}
		if left == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the failed upgrade's children %v are still there", seen)
		}
	}
	l.waitServed(t, 1, 100)
	if p := e.current(); p != parent {
		t.Fatalf("PID file names %d, want the parent %d still", p, parent)
	}
	installBin(t, helloBin, e.bin)
	e.upgrade()
	// The parent takes one upgrade at a time: the one that just succeeded
	// began after the failed one had ended, its report written.
	namesChild := func(msg string) bool {
		for c := range seen {
			if strings.Contains(msg, fmt.Sprintf("child pid=%d ", c)) {
				return true
			}
		}
		return false
	}
	if !slices.ContainsFunc(e.records(), func(r map[string]string) bool {
		return r["level"] == "ERROR" && r["pid"] == strconv.Itoa(parent) && r["generation"] == "1" && r["signal"] != "" &&
			namesChild(r["error"]) && strings.Contains(r["error"], reason)
	}) {
		t.Fatalf("the parent %d logged no error for generation 1's upgrade naming a child (one of %v) and %q:\n%s", parent, seen, reason, e.logText())
	}
	l.waitServed(t, 2, 100)
	r := l.stop()
	requireNoFailures(t, r)
	if r.ServerCloses != 0 || r.ClosedUnderClient != 0 || r.IdleClosed != 0 {
		t.Fatalf("connections closed by the server: %s", r)
	}
	if z := zombies(t, e.current()); len(z) > 0 {
		t.Fatalf("zombies: %v", z)
	}
}

// TestEmbedChildExits1: a new binary that exits 1 leaves the old process
// serving, with no failed request, and the reason logged.
func TestEmbedChildExits1(t *testing.T) {
	failedUpgrade(t, "sleep 0.2; exit 1", "exit status 1")
}

// TestEmbedChildNeverReady: a new binary that never becomes ready is killed
// after -upgrade-timeout; the old process goes on serving.
func TestEmbedChildNeverReady(t *testing.T) {
	failedUpgrade(t, "exec sleep 600", "timed out", "-upgrade-timeout", "2s")
}

// TestEmbedFDsFlat: across 100 upgrades under keep-alive load, the serving
// process's fd count stays flat (it varies only with the client
// connections it holds), is the same idle after the last ones, and no
// process leaves a zombie.
func TestEmbedFDsFlat(t *testing.T) {
	n := 100
	if testing.Short() {
		n = 20
	}
	checkFDsFlat(t, n)
}

func checkFDsFlat(t testing.TB, n int) {
	e := startEmbedded(t)
	addr := waitListening(t, e.current())
	l := startLoad(loadgen.Config{Addr: addr, Clients: 4, Mode: loadgen.KeepAlive, MaxIdle: 20 * time.Millisecond})
	var counts []int
	for i := 0; i < n; i++ {
		p := e.upgrade()
		counts = append(counts, countFDs(t, p))
		if z := zombies(t, p); len(z) > 0 {
			t.Fatalf("upgrade %d: zombies under %d: %v", i+1, p, z)
		}
	}
	requireNoFailures(t, l.stop())
	// Handed-off keep-alive connections come and go with the load: count
	// again with it stopped, once more upgraded.
	p := e.upgrade()
	base := stableFDs(t, p)
	p = e.upgrade()
	if got := stableFDs(t, p); got != base {
		t.Fatalf("fds after the last upgrades: %d then %d; counts under load %v", base, got, counts)
	}
	t.Logf("fd counts of each new process under load: %v; idle: %d", counts, base)
	// Besides the idle set: up to 4 client connections, the channel from
	// the draining parent and its epoll instance, fds in transit. A leak of
	// one fd per upgrade would pass this bound within a dozen upgrades.
	for i, c := range counts {
		if c > base+10 {
			t.Fatalf("upgrade %d: %d fds, idle %d: %v", i+1, c, base, counts)
		}
	}
}

// stableFDs counts pid's fds once the count has not changed for 100 ms
// (connections the clients closed are closed on the server's side too).
func stableFDs(t testing.TB, pid int) int {
	t.Helper()
	n, same := countFDs(t, pid), 0
	for deadline := time.Now().Add(10 * time.Second); same < 10; time.Sleep(10 * time.Millisecond) {
		if m := countFDs(t, pid); m == n {
			same++
		} else {
			n, same = m, 0
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d: fd count does not settle", pid)
		}
	}
	return n
}

// TestEmbedUnderSocketActivation: run by systemd-socket-activate, hello
// -upgrades serves the socket it was given, tells the notify socket
// MAINPID and READY=1, and passes the same socket on at every upgrade
// (on SIGUSR2 and on SIGHUP alike).
func TestEmbedUnderSocketActivation(t *testing.T) {
	if _, err := exec.LookPath("systemd-socket-activate"); err != nil {
		t.Skip("systemd-socket-activate not installed")
	}
	ns := newFakeNotifySocket(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	e := &embedded{t: t, seen: map[int]bool{}}
	dir := t.TempDir()
	e.pid, e.log = filepath.Join(dir, "pid"), filepath.Join(dir, "log")
	logf, err := os.Create(e.log)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	e.cmd = exec.Command("systemd-socket-activate", "-l", addr, "--fdname=web", "-E", "NOTIFY_SOCKET="+ns.path,
		helloBin, "-upgrades", "-pid-file", e.pid)
	e.cmd.Stdout, e.cmd.Stderr = logf, logf
	e.start()
	// systemd-socket-activate starts the service on the first connection.
	var c net.Conn
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if c, err = net.Dial("tcp", addr); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
	}
	c.Close()
	first := e.waitPid(0, 30*time.Second)
	ns.find(t, 10*time.Second, "MAINPID="+strconv.Itoa(first), "READY=1")
	inode := func(pid int) map[string]int { return socketInodes(pid) }
	var listenIno string
	for in := range inode(first) {
		if _, ok := tcpListeners()[in]; ok {
			listenIno = in
		}
	}
	l := startLoad(loadgen.Config{Addr: addr, Clients: 8, Mode: loadgen.KeepAlive, MaxIdle: 50 * time.Millisecond})
	l.waitServed(t, 1, 50)
	for i, sig := range []syscall.Signal{syscall.SIGUSR2, syscall.SIGHUP, syscall.SIGUSR2} {
		p := e.upgradeOn(sig)
		ns.find(t, 10*time.Second, "MAINPID="+strconv.Itoa(p), "READY=1")
		if _, ok := inode(p)[listenIno]; !ok {
			t.Fatalf("generation %d (pid %d) does not hold the activated socket (inode %s)", i+2, p, listenIno)
		}
		l.waitServed(t, i+2, 20)
	}
	r := l.stop()
	requireNoFailures(t, r)
	if r.ServerCloses != 0 || r.ClosedUnderClient != 0 || r.IdleClosed != 0 {
		t.Fatalf("connections closed by the server: %s", r)
	}
	ns.mu.Lock()
	defer ns.mu.Unlock()
	for _, m := range ns.msgs {
		if strings.Contains(m.text, "STOPPING=1") {
			t.Fatalf("a process that upgraded said %q: systemd would stop the service", m.text)
		}
	}
}

// TestEmbedFlagIgnoredUnderUpgrader: under upgrader, -upgrades is ignored
// and upgrader upgrades the binary, live connections included.
func TestEmbedFlagIgnoredUnderUpgrader(t *testing.T) {
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--", helloBin, "-upgrades")
	addr := p.addr("")
	p.waitReady(1)
	stop := runLoad(loadgen.Config{Addr: addr, Clients: 8, Mode: loadgen.KeepAlive, MaxIdle: 50 * time.Millisecond})
	p.upgradeTo(2)
	p.upgradeTo(3)
	r := stop()
	requireNoFailures(t, r)
	if r.ConnsAcrossGenerations == 0 {
		t.Fatalf("no connection handed off under upgrader: %s", r)
	}
}
