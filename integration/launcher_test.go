package integration

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
	"github.com/seed6cb0314a/upgrader/supervise"
)

var (
	launcherOnce sync.Once
	launcherBin  string
	launcherErr  error
)

// buildLauncher builds examples/launcher once, next to the binaries
// TestMain built (and removes); with the race detector but for benchmarks,
// as upgrader is, since it embeds the supervisor.
func buildLauncher(t *testing.T) string {
	t.Helper()
	launcherOnce.Do(func() {
		launcherBin = filepath.Join(filepath.Dir(helloBin), "launcher")
		args := []string{"build", "-o", launcherBin}
		if flag.Lookup("test.bench").Value.String() == "" {
			args = append(args, "-race")
		}
		build := exec.Command("go", append(args, "./examples/launcher")...)
		build.Dir = repoRoot
		if out, err := build.CombinedOutput(); err != nil {
			launcherErr = fmt.Errorf("%v\n%s", err, out)
		}
	})
	if launcherErr != nil {
		t.Fatalf("build examples/launcher: %v", launcherErr)
	}
	return launcherBin
}

// launcherEvent is one line the launcher prints on stdout.
type launcherEvent struct {
	Event        string                     `json:"event"`
	Generation   int                        `json:"generation"`
	OK           bool                       `json:"ok"`
	Reason       string                     `json:"reason"`
	ReadyAfterMS int64                      `json:"ready_after_ms"`
	Listeners    []supervise.ListenerStatus `json:"listeners"`
	Workers      []int                      `json:"workers"`
}

// launched is examples/launcher run by a test: its events as they come,
// its log in a file, every worker pid it named.
type launched struct {
	t       *testing.T
	cmd     *exec.Cmd
	events  chan launcherEvent
	done    chan struct{}
	log     string
	workers map[int]bool
	exe     string // the workers' program
}

// startLauncher runs the launcher with args, which end in "-- PROGRAM";
// the test's cleanup kills it and any worker it named that still runs.
func startLauncher(t *testing.T, args ...string) *launched {
	t.Helper()
	l := &launched{t: t, events: make(chan launcherEvent, 64), done: make(chan struct{}),
		log: filepath.Join(t.TempDir(), "log"), workers: map[int]bool{}, exe: args[len(args)-1]}
	logf, err := os.Create(l.log)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	// Our own pipe, so that Wait waits for the launcher alone; its events
	// go to a close-on-exec copy of its stdout, which no worker holds.
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	l.cmd = exec.Command(buildLauncher(t), args...)
	l.cmd.Stdout, l.cmd.Stderr = w, logf
	err = l.cmd.Start()
	w.Close()
	if err != nil {
		r.Close()
		t.Fatal(err)
	}
	go func() {
		defer r.Close()
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			var ev launcherEvent
			if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
				ev = launcherEvent{Event: "unparsable", Reason: sc.Text()}
			}
			l.events <- ev
		}
	}()
	go func() { l.cmd.Wait(); close(l.done) }()
	t.Cleanup(func() {
		l.cmd.Process.Kill()
		<-l.done
		for pid := range l.workers {
			if l.isWorker(pid) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		if t.Failed() {
			b, _ := os.ReadFile(l.log)
			t.Logf("launcher log:\n%s", b[max(0, len(b)-20000):])
		}
	})
	return l
}

// next returns the launcher's next event, of kind want.
func (l *launched) next(want string) launcherEvent {
	l.t.Helper()
	select {
	case ev := <-l.events:
		if ev.Event != want {
			l.t.Fatalf("launcher event %+v, want %q", ev, want)
		}
		for _, pid := range ev.Workers {
			l.workers[pid] = true
		}
		return ev
	case <-l.done:
		l.t.Fatalf("launcher exited (%v) before its %q event", l.cmd.ProcessState, want)
	case <-time.After(60 * time.Second): // a bound, not a synchronisation
		l.t.Fatalf("no %q event from the launcher within 60s", want)
	}
	return launcherEvent{}
}

// upgrade sends SIGHUP and returns the upgrade event it causes.
func (l *launched) upgrade() launcherEvent {
	l.t.Helper()
	if err := l.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		l.t.Fatal(err)
	}
	return l.next("upgrade")
}

// stop sends SIGTERM and returns the exit code.
func (l *launched) stop() int {
	l.t.Helper()
	if err := l.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		l.t.Fatal(err)
	}
	select {
	case <-l.done:
	case <-time.After(30 * time.Second):
		l.t.Fatal("the launcher did not exit within 30s of SIGTERM")
	}
	return l.cmd.ProcessState.ExitCode()
}

// isWorker reports whether pid still runs the workers' program: a pid
// reused since by another program is not ours.
func (l *launched) isWorker(pid int) bool {
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	_, alive := parentOf(pid)
	return err == nil && alive && exe == l.exe
}

// healthEndpoint serves the launcher's -health-url: it forwards each GET
// to the hello address set once the launcher has said it (the port is the
// kernel's choice), with its status and X-Generation, and answers 503
// until then or while failing is set. checks counts the forwarded GETs.
type healthEndpoint struct {
	url     string
	target  atomic.Pointer[string]
	failing atomic.Bool
	checks  atomic.Int64
}

func newHealthEndpoint(t *testing.T) *healthEndpoint {
	h := &healthEndpoint{}
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		target := h.target.Load()
		if target == nil || h.failing.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		resp, err := client.Get("http://" + *target + "/")
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		resp.Body.Close()
		h.checks.Add(1)
		w.Header().Set("X-Generation", resp.Header.Get("X-Generation"))
		w.WriteHeader(resp.StatusCode)
	}))
	t.Cleanup(srv.Close)
	h.url = srv.URL + "/"
	return h
}

// TestLauncher runs examples/launcher, a program embedding the supervisor
// with its own signals and pre-upgrade check, supervising hello under load
// through 20 upgrades by SIGHUP.
func TestLauncher(t *testing.T) {
	health := newHealthEndpoint(t)
	l := startLauncher(t, "-listen", "127.0.0.1:0", "-health-url", health.url, "--", helloBin)
	ready := l.next("ready")
	if ready.Generation != 1 || len(ready.Listeners) != 1 || len(ready.Workers) != 1 {
		t.Fatalf("ready event %+v, want generation 1 with one listener and one worker", ready)
	}
	addr := ready.Listeners[0].Address
	health.target.Store(&addr)

	load := startLoad(loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.NewConn})
	load.waitServed(t, 1, 50)
	var last launcherEvent
	for gen := 2; gen <= 21; gen++ {
		last = l.upgrade()
		if !last.OK || last.Generation != gen || len(last.Workers) != 1 {
			t.Fatalf("upgrade event %+v, want generation %d ok with one worker", last, gen)
		}
		load.waitServed(t, gen, 50) // each generation serves the load before the next
	}
	r := load.stop()
	requireNoFailures(t, r)
	for _, c := range loadgen.Classes[1:] {
		if r.Counts[c] != 0 {
			t.Errorf("%d requests ended %s", r.Counts[c], c)
		}
	}
	requireGenerations(t, r, 1, 21)
	if n := health.checks.Load(); n != 20 {
		t.Errorf("the launcher's health check reached hello %d times over 20 upgrades, want 20", n)
	}

	// Upgrade returns once the old generation has exited: the launcher's
	// one child left is the worker the last event named.
	if kids, w := children(t, l.cmd.Process.Pid), last.Workers[0]; len(kids) != 1 || kids[w] == "" || kids[w] == "Z" {
		t.Errorf("launcher children %v, want only generation 21's worker %d, alive", kids, last.Workers[0])
	}
	if !l.isWorker(last.Workers[0]) { // else the check after the exit proves nothing
		t.Fatalf("worker %d does not run %s", last.Workers[0], l.exe)
	}
	if code := l.stop(); code != 0 {
		t.Fatalf("the launcher exited %d on SIGTERM, want 0", code)
	}
	pids := slices.Sorted(maps.Keys(l.workers))
	if len(pids) != 21 {
		t.Errorf("the launcher named %d workers %v, want one per generation, 21", len(pids), pids)
	}
	for _, pid := range pids {
		if l.isWorker(pid) {
			t.Errorf("worker %d still runs after the launcher exited", pid)
		}
	}
}

// TestLauncherCheckRefuses: a failing pre-upgrade check (an unhealthy
// service, a command gone from disk) prints a refusal and starts no
// generation; the next upgrade once it passes is generation 2, then 3.
func TestLauncherCheckRefuses(t *testing.T) {
	health := newHealthEndpoint(t)
	bin := filepath.Join(t.TempDir(), "hello")
	installBin(t, helloBin, bin)
	l := startLauncher(t, "-listen", "127.0.0.1:0", "-health-url", health.url, "--", bin)
	addr := l.next("ready").Listeners[0].Address
	health.target.Store(&addr)

	refused := func(what string) {
		t.Helper()
		if ev := l.upgrade(); ev.OK || ev.Generation != 0 || ev.Reason == "" {
			t.Fatalf("%s: upgrade event %+v, want a refusal with a reason and no generation", what, ev)
		}
	}
	upgraded := func(gen int) {
		t.Helper()
		if ev := l.upgrade(); !ev.OK || ev.Generation != gen {
			t.Fatalf("upgrade event %+v, want generation %d ok", ev, gen)
		}
	}
	health.failing.Store(true)
	refused("health check answering 503")
	health.failing.Store(false)
	upgraded(2)

	if err := os.Remove(bin); err != nil {
		t.Fatal(err)
	}
	refused("command removed")
	installBin(t, helloBin, bin)
	upgraded(3)
	if code := l.stop(); code != 0 {
		t.Fatalf("the launcher exited %d on SIGTERM, want 0", code)
	}
}
