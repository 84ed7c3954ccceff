package integration

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
	"github.com/seed6cb0314a/upgrader/internal/control"
	"github.com/seed6cb0314a/upgrader/supervise"
)

func (p *proc) status() supervise.Status {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var st supervise.Status
	err := control.Do(ctx, p.control, control.Request{Command: "status"}, func(b []byte) error { return json.Unmarshal(b, &st) })
	if err != nil {
		p.t.Fatalf("status: %v", err)
	}
	return st
}

func (p *proc) workerPids(gen int) []int {
	for _, g := range p.status().Generations {
		if g.Generation == gen {
			var pids []int
			for _, w := range g.Workers {
				pids = append(pids, w.Pid)
			}
			return pids
		}
	}
	return nil
}

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
	stop := runLoad(loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.NewConn})
	time.Sleep(500 * time.Millisecond)
	victim := p.workerPids(1)[0]
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_, i := p.waitLogFrom(0, 10*time.Second, "killed worker noticed", msg("worker exited unasked", "pid", victim))
	p.waitLogFrom(i, 10*time.Second, "replacement ready", msg("worker ready", "generation", 1))
	time.Sleep(500 * time.Millisecond)
	r := stop()
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
	hm := p.waitLog(10*time.Second, "health endpoints", msg("health endpoints"))
	url := "http://" + hm["address"].(string) + "/readyz"
	if code, body, err := get(url); err == nil && code != 503 {
		t.Errorf("/readyz %d %q while every worker crashes, want 503", code, body)
	}
	if code := p.wait(30 * time.Second); code == 0 {
		t.Fatal("upgrader exited 0 after giving up")
	}
	gave := p.waitLog(time.Second, "giving up", msg("giving up"))
	if gave["restarts"].(float64) != 4 {
		t.Errorf("gave up after %v restarts, want more than --max-restarts 3", gave["restarts"])
	}
	if !strings.Contains(p.tail(5), "giving up: 4 crash restarts") {
		t.Errorf("exit message does not say why:\n%s", p.tail(5))
	}
}

func TestHandlerPanicUnderLoad(t *testing.T) {
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--", helloBin)
	addr := p.addr("")
	p.waitReady(1)
	victim := p.workerPids(1)[0]
	stop := runLoad(loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.NewConn})
	// Requests in flight on the same (only) worker when it panics.
	var wg sync.WaitGroup
	slow := make([]int, 4)
	for i := range slow {
		wg.Add(1)
		go func() {
			defer wg.Done()
			code, _, err := get("http://" + addr + "/?sleep=1s")
			if err != nil {
				t.Errorf("in-flight request: %v", err)
			}
			slow[i] = code
		}()
	}
	time.Sleep(200 * time.Millisecond)
	code, _, err := get("http://" + addr + "/?panic=1")
	if err != nil || code != 500 {
		t.Fatalf("panicking request: %d, %v; want 500", code, err)
	}
	wg.Wait()
	for i, c := range slow {
		if c != 200 {
			t.Errorf("in-flight request %d: %d, want 200", i, c)
		}
	}
	p.waitLog(10*time.Second, "panicking worker exited", msg("worker exited", "pid", victim))
	time.Sleep(200 * time.Millisecond)
	requireNoFailures(t, stop())
	// The replacement started before the panicking worker exited.
	p.mu.Lock()
	replaced, exited := -1, -1
	for i, m := range p.logs {
		if replaced < 0 && m["msg"] == "worker started" && m["pid"] != float64(victim) && m["generation"] == 1.0 && i > 0 && p.logs[i-1]["msg"] == "replacing worker" {
			replaced = i
		}
		if m["msg"] == "worker exited" && m["pid"] == float64(victim) {
			exited = i
			if s := m["status"].(string); s != "exited with status 1" {
				t.Errorf("panicking worker %s, want exit status 1", s)
			}
		}
	}
	p.mu.Unlock()
	if replaced < 0 || replaced > exited {
		t.Fatalf("replacement started at log line %d, panicking worker exited at %d", replaced, exited)
	}
}

func TestReadyzThroughUpgradesAndShutdownDelay(t *testing.T) {
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--health", "127.0.0.1:0", "--shutdown-delay", "1s", "--", helloBin)
	addr := p.addr("")
	hm := p.waitLog(10*time.Second, "health endpoints", msg("health endpoints"))
	readyz := "http://" + hm["address"].(string) + "/readyz"
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
			time.Sleep(5 * time.Millisecond)
		}
	}()
	for gen := 2; gen <= 11; gen++ {
		p.signal(syscall.SIGUSR2)
		p.waitReady(gen)
		time.Sleep(50 * time.Millisecond)
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
	time.Sleep(100 * time.Millisecond)
	p.signal(syscall.SIGTERM)
	time.Sleep(20 * time.Millisecond)
	deadline := time.Now().Add(800 * time.Millisecond)
	n := 0
	for time.Now().Before(deadline) {
		code, body, err := get(readyz)
		if err != nil || code != 503 {
			t.Fatalf("/readyz after TERM: %d %q %v, want 503", code, body, err)
		}
		n++
		time.Sleep(10 * time.Millisecond)
	}
	if p.hasLog(msg("draining generation", "generation", 11)) {
		t.Fatal("draining began before --shutdown-delay was over")
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
	web, api := freePort(t), freePort(t)
	dir := t.TempDir()
	ctl := filepath.Join(dir, "control.sock")
	cmd := exec.Command("systemd-socket-activate", "-l", web, "-l", api, "--fdname=web:api",
		upgraderBin, "--log-format", "json", "--control", ctl, "--", helloBin)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	defer func() {
		syscall.Kill(pid, syscall.SIGTERM)
		cmd.Wait()
	}()
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
			time.Sleep(100 * time.Millisecond)
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
	time.Sleep(time.Second) // the pings keep it alive meanwhile
	if p.hasLog(msg("replacing worker")) {
		t.Fatal("a worker that pings was replaced")
	}
	if code, _, err := get("http://" + addr + "/?hang=1"); err != nil || code != 200 {
		t.Fatalf("hang request: %d %v", code, err)
	}
	r := p.waitLog(5*time.Second, "hung worker replaced", msg("replacing worker", "pid", victim))
	if !strings.Contains(r["reason"].(string), "no WATCHDOG=1 for 500ms") {
		t.Errorf("reason %q", r["reason"])
	}
	p.waitLog(5*time.Second, "hung worker gone", msg("worker exited", "pid", victim))
	p.waitLog(5*time.Second, "replacement ready", func(m map[string]any) bool {
		return m["msg"] == "worker ready" && m["pid"] != float64(victim)
	})
}

func TestRecoveryBadInput(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	p := startUpgrader(t, "--health", busy.Addr().String(), "--", helloBin)
	if code := p.wait(10 * time.Second); code == 0 || !strings.Contains(p.tail(5), "--health \""+busy.Addr().String()+"\"") {
		t.Errorf("--health on a busy port: exit %d:\n%s", code, p.tail(5))
	}

	// LISTEN_FDS naming fds that are not open.
	cmd := exec.Command("sh", "-c", `LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=a:b exec "$0" -- "$1"`, upgraderBin, helloBin)
	b, _ := cmd.CombinedOutput()
	if cmd.ProcessState.ExitCode() == 0 || !strings.Contains(string(b), "LISTEN_FDS=2") || !strings.Contains(string(b), "fd 3") {
		t.Errorf("LISTEN_FDS=2 with no fds open: exit %d:\n%s", cmd.ProcessState.ExitCode(), b)
	}

	// A control request that is not valid gets an error naming it, and the
	// supervisor carries on.
	q := startUpgrader(t, "--", helloBin)
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
