package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
	"github.com/seed6cb0314a/upgrader/supervise"
)

func get(url string) (int, string, error) {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

func TestKilledWorkerIsReplacedWithoutRefusals(t *testing.T) {
	p := startUpgrader(t, "-l", "127.0.0.1:0", "-w", "2", "--", helloBin)
	addr := p.addr("")
	p.waitReady(1)
	l := startLoad(loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.NewConn})
	l.waitServed(t, 1, 100)
	victim := p.workerPids(1)[0]
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	p.waitStatus(10*time.Second, "the killed worker replaced", func(st supervise.Status) bool {
		g := genOf(st, 1)
		if g == nil || len(g.Workers) != 2 {
			return false
		}
		for _, w := range g.Workers {
			if w.Pid == victim || w.State != supervise.WorkerReady {
				return false
			}
		}
		return true
	})
	// The load goes on a while with the replacement.
	l.waitServed(t, 1, 100)
	r := l.stop()
	t.Logf("load: %s", r)
	if r.Counts[loadgen.Refused] != 0 {
		t.Fatalf("%d connections refused", r.Counts[loadgen.Refused])
	}
	// Only what was in flight on the killed worker may fail: at most one
	// request per client, each cut by the kill (reset or EOF).
	if r.Failed() > 16 || r.Failed() != r.Counts[loadgen.Reset]+r.Counts[loadgen.EOF] {
		t.Fatalf("%d failures beyond requests in flight on the killed worker", r.Failed())
	}
	st := p.status()
	if len(st.Generations) != 1 || len(st.Generations[0].Workers) != 2 || st.Generations[0].Restarts != 1 {
		t.Fatalf("generations %+v; want generation 1 with 2 workers and 1 restart", st.Generations)
	}
}

func TestCrashingWorkerMakesUpgraderGiveUp(t *testing.T) {
	p := startUpgrader(t, "--health", "127.0.0.1:0", "--max-restarts", "3", "--", "sh", "-c", "echo crashing >&2; exit 3")
	url := "http://" + p.healthAddr() + "/readyz"
	if code, body, err := get(url); err != nil || code != 503 {
		t.Errorf("/readyz %d %q %v while every worker crashes, want 503", code, body, err)
	}
	// Having given up, upgrader stays a moment (so that probes see it):
	// its status says so, after 4 restarts, more than --max-restarts 3.
	st := p.waitStatus(30*time.Second, "given up", func(st supervise.Status) bool { return st.GaveUp })
	if st.Ready || st.Restarts != 4 {
		t.Errorf("status on giving up: ready %v, %d restarts; want not ready after 4, more than --max-restarts 3", st.Ready, st.Restarts)
	}
	if code := p.wait(30 * time.Second); code == 0 {
		t.Fatal("upgrader exited 0 after giving up")
	}
	// Its report to the operator, an error, counts the restarts.
	p.expectLogged(5*time.Second, "an error counting 4 restarts", func(m map[string]any) bool {
		return m["level"] == "error" && m["restarts"] == float64(4)
	})
}

func TestHandlerPanicUnderLoad(t *testing.T) {
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--", helloBin)
	addr := p.addr("")
	p.waitReady(1)
	victim := p.workerPids(1)[0]
	stop := runLoad(loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.NewConn})
	// Requests in flight on the same (only) worker when it panics: each is
	// read by the worker before the panicking request is sent.
	type reply struct {
		code int
		pid  string
		err  error
	}
	slow := make([]chan reply, 4)
	for i := range slow {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write([]byte("POST /?sleep=2s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi")); err != nil {
			t.Fatal(err)
		}
		waitConsumed(t, c, victim)
		slow[i] = make(chan reply, 1)
		go func() {
			c.SetDeadline(time.Now().Add(10 * time.Second))
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				slow[i] <- reply{err: err}
				return
			}
			resp.Body.Close()
			slow[i] <- reply{code: resp.StatusCode, pid: resp.Header.Get("X-Pid")}
		}()
	}
	code, _, err := get("http://" + addr + "/?panic=1")
	if err != nil || code != 500 {
		t.Fatalf("panicking request: %d, %v; want 500", code, err)
	}
	// The replacement starts while the panicking worker still finishes
	// what it has in flight (2s).
	p.waitStatus(10*time.Second, "a replacement started beside the panicking worker", func(st supervise.Status) bool {
		g := genOf(st, 1)
		if g == nil {
			return false
		}
		old, other := false, false
		for _, w := range g.Workers {
			old = old || w.Pid == victim
			other = other || w.Pid != victim
		}
		if !old && !other {
			return false
		}
		if !old {
			t.Fatalf("the panicking worker exited before its replacement started: %+v", g.Workers)
		}
		return other
	})
	for i, ch := range slow {
		if r := <-ch; r.err != nil || r.code != 200 || r.pid != strconv.Itoa(victim) {
			t.Errorf("in-flight request %d: %d from pid %s, %v; want 200 from the panicking worker %d", i, r.code, r.pid, r.err, victim)
		}
	}
	p.waitStatus(10*time.Second, "the panicking worker gone and its replacement ready", func(st supervise.Status) bool {
		g := genOf(st, 1)
		return g != nil && len(g.Workers) == 1 && g.Workers[0].Pid != victim && g.Workers[0].State == supervise.WorkerReady
	})
	requireNoFailures(t, stop())
}

func TestReadyzThroughUpgradesAndShutdownDelay(t *testing.T) {
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--health", "127.0.0.1:0", "--shutdown-delay", "1s", "--", helloBin)
	addr := p.addr("")
	readyz := "http://" + p.healthAddr() + "/readyz"
	p.waitReady(1)

	var mu sync.Mutex
	var codes []int
	probing := true
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			mu.Lock()
			on := probing
			mu.Unlock()
			if !on {
				return
			}
			code, _, err := get(readyz)
			if err != nil {
				code = -1
			}
			mu.Lock()
			codes = append(codes, code)
			mu.Unlock()
			time.Sleep(5 * time.Millisecond) // probing interval
		}
	}()
	probes := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(codes)
	}
	for gen := 2; gen <= 11; gen++ {
		p.signal(syscall.SIGUSR2)
		p.waitReady(gen)
		// Probes between this upgrade and the next, too.
		for n := probes(); probes() < n+2; {
			time.Sleep(time.Millisecond) // polling interval
		}
	}
	mu.Lock()
	probing = false
	mu.Unlock()
	<-done
	for i, c := range codes {
		if c != 200 {
			t.Fatalf("probe %d of %d during upgrades: %d, want 200", i, len(codes), c)
		}
	}
	t.Logf("%d /readyz probes during 10 upgrades, all 200", len(codes))

	// TERM: /readyz turns 503 at once and stays so through the shutdown
	// delay, while the service itself still answers.
	stopLoad := runLoad(loadgen.Config{Addr: addr, Clients: 8, Mode: loadgen.NewConn})
	term := time.Now()
	p.signal(syscall.SIGTERM)
	p.waitStatus(time.Second, "stopping", func(st supervise.Status) bool { return st.Stopping })
	// A fixed window inside the 1s delay: every probe in it must say 503.
	n := 0
	for time.Since(term) < 800*time.Millisecond {
		code, body, err := get(readyz)
		if err != nil || code != 503 {
			t.Fatalf("/readyz after TERM: %d %q %v, want 503", code, body, err)
		}
		n++
		time.Sleep(10 * time.Millisecond) // probing interval
	}
	if g := genOf(p.status(), 11); g == nil || g.State == supervise.GenDraining || g.State == supervise.GenExited {
		t.Fatalf("generation 11 %+v draining before --shutdown-delay was over", g)
	} else {
		for _, w := range g.Workers {
			if w.State != supervise.WorkerReady {
				t.Fatalf("worker %+v not ready before --shutdown-delay was over", w)
			}
		}
	}
	requireNoFailures(t, stopLoad())
	t.Logf("%d /readyz probes during the shutdown delay, all 503", n)
	if code := p.wait(30 * time.Second); code != 0 {
		t.Fatalf("graceful stop exited %d", code)
	}
}

func runCLI(t *testing.T, args ...string) (string, int) {
	t.Helper()
	out, err := exec.Command(upgraderBin, args...).CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return string(out), code
}

func TestUpgradeCommandFollowsProgress(t *testing.T) {
	p, script, addr := startScripted(t, "exec "+helloBin)
	out, code := runCLI(t, "upgrade", "--control", p.control)
	t.Logf("upgrader upgrade:\n%s", out)
	for _, want := range []string{"generation 2 started", "generation 2 ready after", "generation 1 draining with", "done: generation 2 serving"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if code != 0 {
		t.Fatalf("exit %d for a good version", code)
	}
	writeScript(t, script, "echo 'missing config' >&2; exit 1")
	out, code = runCLI(t, "upgrade", "--control", p.control)
	t.Logf("upgrader upgrade (broken):\n%s", out)
	if code == 0 || !strings.Contains(out, "upgrade to generation 3 failed: worker 0") || !strings.Contains(out, "exited with status 1 before it was ready") {
		t.Fatalf("exit %d; want non-zero with the reason", code)
	}
	if c, body, err := get("http://" + addr + "/"); err != nil || c != 200 || !strings.Contains(body, "generation 2") {
		t.Fatalf("after the failed upgrade: %d %q %v; want generation 2 serving", c, body, err)
	}
	out, code = runCLI(t, "status", "--control", p.control)
	if code != 0 || !strings.Contains(out, "generation 2 serving") || !strings.Contains(out, "last upgrade: generation 3 failed") {
		t.Fatalf("upgrader status (exit %d):\n%s", code, out)
	}
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func TestSocketActivationWithTwoNamedSockets(t *testing.T) {
	if _, err := exec.LookPath("systemd-socket-activate"); err != nil {
		t.Fatalf("systemd-socket-activate is needed (.ci/run installs the systemd package): %v", err)
	}
	dir := t.TempDir()
	ctl := filepath.Join(dir, "control.sock")
	// systemd-socket-activate refuses port 0, so it gets ports the kernel
	// just handed out and released; should another process take one in
	// between, it fails to bind and the test tries other ports.
	var cmd *exec.Cmd
	var pid int
	var web, api string
	for attempt := 1; web == "" || api == ""; attempt++ {
		if attempt > 5 {
			t.Fatal("systemd-socket-activate bound no free ports in 5 attempts")
		}
		web, api = freePort(t), freePort(t)
		cmd = exec.Command("systemd-socket-activate", "-l", web, "-l", api, "--fdname=web:api",
			upgraderBin, "--log-format", "json", "--control", ctl, "--", helloBin)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		pid = cmd.Process.Pid
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		// It holds the listeners at fds 3 and 4 until the first connection.
		for deadline := time.Now().Add(10 * time.Second); listenerAt(pid, 3) != web || listenerAt(pid, 4) != api; {
			if time.Now().After(deadline) {
				syscall.Kill(pid, syscall.SIGKILL)
				t.Fatalf("systemd-socket-activate holds no listeners on %s and %s at fds 3 and 4 after 10s", web, api)
			}
			select {
			case <-exited:
				web, api = "", ""
			case <-time.After(5 * time.Millisecond): // polling interval
				continue
			}
			break
		}
		if web != "" {
			defer func() {
				syscall.Kill(pid, syscall.SIGTERM)
				<-exited
			}()
		}
	}
	// systemd-socket-activate starts upgrader on the first connection; that
	// connection waits in the backlog until a worker is ready.
	for _, addr := range []string{web, api} {
		var code int
		var body string
		var err error
		for i := 0; i < 50; i++ {
			if code, body, err = get("http://" + addr + "/"); err == nil {
				break
			}
			time.Sleep(100 * time.Millisecond) // retry interval
		}
		if err != nil || code != 200 {
			t.Fatalf("%s: %d %q %v", addr, code, body, err)
		}
	}
	out, code := runCLI(t, "status", "--control", ctl, "--json")
	var st supervise.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil || code != 0 {
		t.Fatalf("status (%d): %v\n%s", code, err, out)
	}
	if st.Pid != pid || len(st.Listeners) != 2 || st.Listeners[0].Name != "web" || st.Listeners[1].Name != "api" ||
		st.Listeners[0].Address != web || st.Listeners[1].Address != api {
		t.Fatalf("listeners %+v (pid %d, want %d); want web=%s and api=%s from LISTEN_FDS", st.Listeners, st.Pid, pid, web, api)
	}
	// The worker got both, with their names.
	if env := environ(t, st.Generations[0].Workers[0].Pid); env["LISTEN_FDNAMES"] != "web:api" || env["LISTEN_FDS"] != "2" {
		t.Fatalf("worker environment lacks LISTEN_FDS=2 and LISTEN_FDNAMES=web:api")
	}
	if out, code := runCLI(t, "upgrade", "--control", ctl); code != 0 {
		t.Fatalf("upgrade under socket activation: %s", out)
	}
}

func TestWatchdogReplacesHungWorker(t *testing.T) {
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--watchdog", "500ms", "--", helloBin)
	addr := p.addr("")
	p.waitReady(1)
	victim := p.workerPids(1)[0]
	// A negative check over a fixed window of twice the watchdog interval:
	// a worker that pings is kept.
	for start := time.Now(); time.Since(start) < time.Second; time.Sleep(50 * time.Millisecond) {
		if pids := p.workerPids(1); len(pids) != 1 || pids[0] != victim {
			t.Fatalf("a worker that pings was replaced: workers %v, was %d", pids, victim)
		}
	}
	if code, _, err := get("http://" + addr + "/?hang=1"); err != nil || code != 200 {
		t.Fatalf("hang request: %d %v", code, err)
	}
	// The hung worker still runs, and only the watchdog ends it.
	p.waitStatus(5*time.Second, "the hung worker gone and its replacement ready", func(st supervise.Status) bool {
		g := genOf(st, 1)
		return g != nil && len(g.Workers) == 1 && g.Workers[0].Pid != victim && g.Workers[0].State == supervise.WorkerReady
	})
	if c, body, err := get("http://" + addr + "/"); err != nil || c != 200 || strings.Contains(body, "pid "+strconv.Itoa(victim)+" ") {
		t.Fatalf("after the watchdog: %d %q %v; want the replacement serving", c, body, err)
	}
}

func TestRecoveryBadInput(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	p := startUpgrader(t, "--health", busy.Addr().String(), "-l", "127.0.0.1:0", "--", helloBin)
	if code := p.wait(10 * time.Second); code == 0 || !strings.Contains(p.tail(5), "--health \""+busy.Addr().String()+"\"") {
		t.Errorf("--health on a busy port: exit %d:\n%s", code, p.tail(5))
	}

	// LISTEN_FDS naming fds that are not open.
	cmd := exec.Command("sh", "-c", `LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=a:b exec "$0" -- "$1"`, upgraderBin, helloBin)
	b, _ := cmd.CombinedOutput()
	if cmd.ProcessState.ExitCode() == 0 || !strings.Contains(string(b), "LISTEN_FDS=2") || !strings.Contains(string(b), "fd 3") {
		t.Errorf("LISTEN_FDS=2 with no fds open: exit %d:\n%s", cmd.ProcessState.ExitCode(), b)
	}

	// More names in LISTEN_FDNAMES than LISTEN_FDS has fds: refused, as
	// sd_listen_fds_with_names(3) refuses it, naming both variables.
	// (Accepted, it would serve: the bound is the context's.)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd = exec.CommandContext(ctx, "sh", "-c", `LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=web:admin exec "$0" --control none -- "$1" 3<&0`, upgraderBin, helloBin)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	lf, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	cmd.Stdin, cmd.WaitDelay = lf, 2*time.Second
	b, _ = cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Errorf("LISTEN_FDS=1 LISTEN_FDNAMES=web:admin: accepted, upgrader still ran after 10s:\n%s", b)
	} else if cmd.ProcessState.ExitCode() == 0 || !strings.Contains(string(b), "LISTEN_FDNAMES=") || !strings.Contains(string(b), "LISTEN_FDS=1") {
		t.Errorf("LISTEN_FDS=1 LISTEN_FDNAMES=web:admin: exit %d:\n%s", cmd.ProcessState.ExitCode(), b)
	}

	// A control request that is not valid gets an error naming it, and the
	// supervisor carries on.
	q := startUpgrader(t, "-l", "127.0.0.1:0", "--", helloBin)
	q.waitReady(1)
	for req, want := range map[string]string{
		"reboot\n":                    `control request "reboot"`,
		`{"command":"reboot"}` + "\n": `unknown command "reboot"`,
		`{"cmd":"status"}` + "\n":     `unknown field "cmd"`,
	} {
		c, err := net.Dial("unix", q.control)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte(req))
		reply, _ := io.ReadAll(c)
		c.Close()
		if !strings.Contains(string(reply), `"error"`) || !strings.Contains(string(reply), strings.ReplaceAll(want, `"`, `\"`)) {
			t.Errorf("request %q: reply %q does not name %s", req, reply, want)
		}
	}
	if st := q.status(); !st.Ready {
		t.Fatal("supervisor not ready after bad control requests")
	}
}
