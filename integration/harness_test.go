// Package integration tests upgrader end to end: real binaries, real
// signals, real sockets and real load from loadgen, on loopback only.
package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
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
	"github.com/seed6cb0314a/upgrader/internal/control"
	"github.com/seed6cb0314a/upgrader/internal/execshim"
	"github.com/seed6cb0314a/upgrader/internal/proctree"
	"github.com/seed6cb0314a/upgrader/supervise"
)

// Binaries built once by TestMain.
var (
	upgraderBin string
	helloBin    string
	repoRoot    string
)

func TestMain(m *testing.M) {
	if os.Getenv(holdEnv) != "" {
		os.Exit(holdConnections()) // a client process of BenchmarkHandoff100k
	}
	dir, err := os.MkdirTemp("", "upgrader-integration-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	repoRoot, _ = filepath.Abs("..")
	upgraderBin = filepath.Join(dir, "upgrader")
	helloBin = filepath.Join(dir, "hello")
	// The supervisor is built with the race detector for tests (its loop,
	// sources and timers run concurrently for real here), and without it
	// for benchmarks, whose figures would otherwise be the detector's. A
	// binary built without it is static (CGO_ENABLED=0), as the packages
	// ship it (scripts/package): a dynamically linked upgrader was 2 MiB
	// more RSS (libc's pages), and each of its shims' starts ran the
	// dynamic loader.
	flag.Parse()
	race := flag.Lookup("test.bench").Value.String() == ""
	for _, b := range []struct {
		out, pkg string
		race     bool
	}{
		{upgraderBin, "./cmd/upgrader", race},
		{helloBin, "./examples/hello", false},
	} {
		args := []string{"build", "-o", b.out}
		if b.race {
			args = append(args, "-race")
		}
		cmd := exec.Command("go", append(args, b.pkg)...)
		cmd.Dir, cmd.Stdout, cmd.Stderr = repoRoot, os.Stderr, os.Stderr
		if !b.race {
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		}
		if err := cmd.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "build", b.pkg, err)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// proc is one upgrader process started by a test.
type proc struct {
	t    testing.TB
	cmd  *exec.Cmd
	pid  int
	mu   sync.Mutex
	cond *sync.Cond
	logs []map[string]any
	raw  []string
	done chan struct{}
	err  error
	// readerDone is closed when the log pipe is drained.
	readerDone chan struct{}
	// control is the control socket's path.
	control string
	// workers holds every worker pid seen in a status reply, for the
	// cleanup.
	workers map[int]bool
}

// startUpgrader runs upgrader with args (JSON logs added) and returns once
// it has started; the test's cleanup kills it by pid if it still runs.
func startUpgrader(t testing.TB, args ...string) *proc {
	t.Helper()
	return startUpgraderEnv(t, nil, args...)
}

// startUpgraderEnv is startUpgrader with env added to upgrader's
// environment (and so to its workers').
func startUpgraderEnv(t testing.TB, env []string, args ...string) *proc {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command(upgraderBin, append([]string{"run", "--log-format", "json", "--log-level", "debug",
		"--control", filepath.Join(dir, "control.sock")}, args...)...)
	cmd.Dir = dir
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	return startProc(t, cmd, filepath.Join(dir, "control.sock"))
}

// startProc starts cmd, an upgrader whose control socket is control, and
// follows it: its log, its exit, and at the test's end the workers it left.
func startProc(t testing.TB, cmd *exec.Cmd, control string) *proc {
	t.Helper()
	// Our own pipe, not StderrPipe: workers inherit it and may outlive a
	// killed upgrader, and Wait must not wait for them.
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = os.Stdout, w
	err = cmd.Start()
	w.Close()
	if err != nil {
		r.Close()
		t.Fatal(err)
	}
	p := &proc{t: t, cmd: cmd, pid: cmd.Process.Pid, done: make(chan struct{}), readerDone: make(chan struct{}),
		control: control, workers: map[int]bool{}}
	p.cond = sync.NewCond(&p.mu)
	go p.read(r)
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		p.err = err
		close(p.done)
		p.cond.Broadcast()
		p.mu.Unlock()
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			syscall.Kill(p.pid, syscall.SIGKILL)
			<-p.done
		}
		// Workers get the drain signal when upgrader dies (PR_SET_PDEATHSIG),
		// but one still inside a wrapper script may swallow it: stop every
		// worker of this upgrader seen in its status that is still its
		// orphan (or, by a race, its child).
		p.mu.Lock()
		for pid := range p.workers {
			if ppid, ok := parentOf(pid); ok && (ppid == 1 || ppid == p.pid) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		p.mu.Unlock()
		if t.Failed() {
			p.settle()
			t.Logf("upgrader log (last 200 lines):\n%s", p.tail(200))
		}
	})
	return p
}

// settle gives the log reader a moment to catch up after the exit.
func (p *proc) settle() {
	select {
	case <-p.readerDone:
	case <-time.After(time.Second):
	}
}

func (p *proc) read(r *os.File) {
	defer close(p.readerDone)
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) != nil {
			m = nil
		}
		p.mu.Lock()
		p.raw = append(p.raw, line)
		if m != nil {
			p.logs = append(p.logs, m)
		}
		p.cond.Broadcast()
		p.mu.Unlock()
	}
}

func (p *proc) tail(n int) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.raw[max(0, len(p.raw)-n):], "\n")
}

// expectLogged is for tests whose subject is what upgrader logs (the spec
// says "dropped and logged"), never for synchronization: the test first
// waits on state for the event to have happened, and timeout only covers
// the log pipe's latency. match should look at the entry's content (the
// input it names), not at the message's wording. match must not call other
// proc methods.
func (p *proc) expectLogged(timeout time.Duration, what string, match func(map[string]any) bool) map[string]any {
	p.t.Helper()
	deadline := time.Now().Add(timeout)
	timer := time.AfterFunc(timeout, func() { p.mu.Lock(); p.cond.Broadcast(); p.mu.Unlock() })
	defer timer.Stop()
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := 0; ; {
		for ; i < len(p.logs); i++ {
			if match(p.logs[i]) {
				return p.logs[i]
			}
		}
		select {
		case <-p.readerDone:
		default:
			if time.Now().Before(deadline) {
				p.cond.Wait()
				continue
			}
		}
		p.mu.Unlock()
		defer p.mu.Lock()
		p.t.Fatalf("upgrader did not log %s", what)
	}
}

// status is tryStatus, failing the test on error.
func (p *proc) status() supervise.Status {
	p.t.Helper()
	st, err := p.tryStatus()
	if err != nil {
		p.t.Fatalf("status: %v", err)
	}
	return st
}

// tryStatus asks the running upgrader for its status over the control
// socket, and remembers the worker pids it names for the cleanup.
func (p *proc) tryStatus() (supervise.Status, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var st supervise.Status
	err := control.Do(ctx, p.control, control.Request{Command: "status"}, func(line []byte) error {
		return json.Unmarshal(line, &st)
	})
	if err == nil {
		p.mu.Lock()
		for _, g := range st.Generations {
			for _, w := range g.Workers {
				if w.Pid > 0 {
					p.workers[w.Pid] = true
				}
			}
		}
		p.mu.Unlock()
	}
	return st, err
}

// waitStatus polls the status until cond holds and returns that status; it
// fails the test when upgrader exits first or timeout passes.
func (p *proc) waitStatus(timeout time.Duration, what string, cond func(supervise.Status) bool) supervise.Status {
	p.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st, err := p.tryStatus()
		if err == nil && cond(st) {
			return st
		}
		select {
		case <-p.done:
			p.t.Fatalf("upgrader exited (%v) before %s", p.err, what)
		default:
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("not %s within %s (last status %+v, error %v)", what, timeout, st, err)
		}
		time.Sleep(5 * time.Millisecond) // polling interval, not synchronization
	}
}

// genOf returns generation n in st, or nil once it has exited.
func genOf(st supervise.Status, n int) *supervise.GenStatus {
	for i := range st.Generations {
		if st.Generations[i].N == n {
			return &st.Generations[i]
		}
	}
	return nil
}

// generationReady reports whether generation gen is serving: it is the
// current one, active, with no worker still starting and one ready; or a
// later generation has replaced it.
func generationReady(st supervise.Status, gen int) bool {
	if st.Current != gen {
		return st.Current > gen
	}
	g := genOf(st, gen)
	if g == nil || g.State != supervise.GenActive {
		return false
	}
	ready := 0
	for _, w := range g.Workers {
		switch w.State {
		case supervise.WorkerReady:
			ready++
		case supervise.WorkerStarting:
			return false
		}
	}
	return ready > 0
}

// addr returns the address of the listener named name (the first, if
// empty), from the status once the control socket answers.
func (p *proc) addr(name string) string {
	p.t.Helper()
	var a string
	p.waitStatus(10*time.Second, "listener "+name+" in the status", func(st supervise.Status) bool {
		for _, l := range st.Listeners {
			if name == "" || l.Name == name {
				a = l.Address
				return true
			}
		}
		return false
	})
	return a
}

// healthAddr returns the address of the --health endpoints: upgrader binds
// them before its control socket, so once that answers they are the one
// listening TCP socket upgrader holds that is not a worker listener.
func (p *proc) healthAddr() string {
	p.t.Helper()
	st := p.waitStatus(10*time.Second, "the control socket answers", func(supervise.Status) bool { return true })
	known := map[string]bool{}
	for _, l := range st.Listeners {
		known[l.Address] = true
	}
	var found []string
	for _, a := range listeningAddrs(p.pid) {
		if !known[a] {
			found = append(found, a)
		}
	}
	if len(found) != 1 {
		p.t.Fatalf("upgrader listens on %v besides its listeners %v; want exactly the health endpoints", found, st.Listeners)
	}
	return found[0]
}

// waitReady waits until generation gen serves (generationReady).
func (p *proc) waitReady(gen int) supervise.Status {
	p.t.Helper()
	return p.waitStatus(30*time.Second, fmt.Sprintf("generation %d ready", gen), func(st supervise.Status) bool {
		return generationReady(st, gen)
	})
}

// waitExited waits until generation gen has no process left.
func (p *proc) waitExited(gen int) supervise.Status {
	p.t.Helper()
	return p.waitStatus(30*time.Second, fmt.Sprintf("generation %d exited", gen), func(st supervise.Status) bool {
		return genOf(st, gen) == nil
	})
}

// upgradeTo sends USR2 and waits until generation gen is ready and every
// older one has exited.
func (p *proc) upgradeTo(gen int) {
	p.t.Helper()
	p.signal(syscall.SIGUSR2)
	p.waitStatus(30*time.Second, fmt.Sprintf("generation %d ready and the older ones exited", gen), func(st supervise.Status) bool {
		if !generationReady(st, gen) {
			return false
		}
		for _, g := range st.Generations {
			if g.N < gen {
				return false
			}
		}
		return true
	})
}

// upgrade asks for an upgrade over the control socket and follows it
// until "done" or "failed"; it returns the progress events, each with the
// time it arrived.
func (p *proc) upgrade(timeout time.Duration) ([]supervise.Progress, []time.Time) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var evs []supervise.Progress
	var at []time.Time
	err := control.Do(ctx, p.control, control.Request{Command: "upgrade", Wait: true}, func(line []byte) error {
		var e supervise.Progress
		if err := json.Unmarshal(line, &e); err != nil {
			return fmt.Errorf("progress %q: %w", line, err)
		}
		evs, at = append(evs, e), append(at, time.Now())
		return nil
	})
	if err != nil {
		p.t.Fatalf("upgrade: %v (progress %+v)", err, evs)
	}
	if n := len(evs); n == 0 || (evs[n-1].Event != "done" && evs[n-1].Event != "failed") {
		p.t.Fatalf("upgrade progress %+v does not end in done or failed", evs)
	}
	return evs, at
}

// workerPids lists the pids of generation gen's workers.
func (p *proc) workerPids(gen int) []int {
	p.t.Helper()
	var pids []int
	if g := genOf(p.status(), gen); g != nil {
		for _, w := range g.Workers {
			pids = append(pids, w.Pid)
		}
	}
	return pids
}

func (p *proc) signal(sig syscall.Signal) {
	p.t.Helper()
	if err := syscall.Kill(p.pid, sig); err != nil {
		p.t.Fatalf("signal %v to upgrader pid %d: %v", sig, p.pid, err)
	}
}

// stop sends sig and waits for the exit; it returns the exit code.
func (p *proc) stop(sig syscall.Signal, timeout time.Duration) int {
	p.t.Helper()
	p.signal(sig)
	return p.wait(timeout)
}

func (p *proc) wait(timeout time.Duration) int {
	p.t.Helper()
	select {
	case <-p.done:
	case <-time.After(timeout):
		p.t.Fatalf("upgrader pid %d did not exit within %s", p.pid, timeout)
	}
	p.settle()
	return p.cmd.ProcessState.ExitCode()
}

// load is loadgen running in the background.
type load struct {
	cancel context.CancelFunc
	res    chan loadgen.Result
	mu     sync.Mutex
	served map[string]int // OK responses so far, by generation
}

// startLoad runs loadgen in the background.
func startLoad(cfg loadgen.Config) *load {
	ctx, cancel := context.WithCancel(context.Background())
	if cfg.Duration == 0 {
		cfg.Duration = 2 * time.Minute // a bound, in case the test forgets to stop it
	}
	l := &load{cancel: cancel, res: make(chan loadgen.Result, 1), served: map[string]int{}}
	cfg.OnOK = func(gen string) {
		l.mu.Lock()
		l.served[gen]++
		l.mu.Unlock()
	}
	go func() { l.res <- loadgen.Run(ctx, cfg) }()
	return l
}

// stop ends the load and returns its result.
func (l *load) stop() loadgen.Result {
	l.cancel()
	return <-l.res
}

// count is the number of OK responses from generation gen so far.
func (l *load) count(gen int) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.served[strconv.Itoa(gen)]
}

// waitServed waits until generation gen has answered n more OK responses
// than it had at the call.
func (l *load) waitServed(t testing.TB, gen, n int) {
	t.Helper()
	want := l.count(gen) + n
	deadline := time.Now().Add(30 * time.Second)
	for l.count(gen) < want {
		if time.Now().After(deadline) {
			t.Fatalf("the load got %d OK responses from generation %d within 30s, want %d", l.count(gen), gen, want)
		}
		time.Sleep(time.Millisecond) // polling interval
	}
}

// runLoad runs loadgen in the background; the returned func stops it and
// returns the result.
func runLoad(cfg loadgen.Config) (stop func() loadgen.Result) {
	return startLoad(cfg).stop
}

// requireNoFailures fails the test when any request failed.
func requireNoFailures(t testing.TB, r loadgen.Result) {
	t.Helper()
	t.Logf("load: %s", r)
	if r.Requests == 0 {
		t.Fatal("the load generator sent no request")
	}
	if r.Failed() != 0 {
		t.Fatalf("%d of %d requests failed", r.Failed(), r.Requests)
	}
}

// writeScript writes an executable shell script; rewriting it is how a test
// puts "a new version" on disk.
func writeScript(t testing.TB, path, body string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// children lists the pids whose parent is pid, with their state letter,
// but for the spare shims a supervisor keeps for its next workers (which a
// zombie is not: its command line is gone).
func children(t testing.TB, pid int) map[int]string {
	t.Helper()
	out := allChildren(t, pid)
	for c := range out {
		if isSpare(c) {
			delete(out, c)
		}
	}
	return out
}

// allChildren lists the pids whose parent is pid, spare shims included,
// with their state letter.
func allChildren(t testing.TB, pid int) map[int]string {
	t.Helper()
	tab, err := proctree.Read("/proc")
	if err != nil {
		t.Fatal(err)
	}
	out := map[int]string{}
	for _, p := range tab {
		if p.PPid == pid {
			out[p.Pid] = string(p.State)
		}
	}
	return out
}

// isSpare tells whether pid is a spare shim, by its command line.
func isSpare(pid int) bool {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	args := strings.Split(string(b), "\x00")
	return len(args) > 2 && args[1] == execshim.ShimArg && args[2] == execshim.SpareArg
}

// waitSpares waits until upgrader keeps n spare shims (status "spares"):
// none is being started, and its fds are as they stay.
func (p *proc) waitSpares(n int) {
	p.waitStatus(30*time.Second, fmt.Sprintf("%d spare shims", n), func(st supervise.Status) bool { return len(st.Spares) == n })
}

func countFDs(t testing.TB, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// parentOf reads pid's parent from /proc; ok is false once pid is gone.
func parentOf(pid int) (int, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, false
	}
	p, err := proctree.ParseStat(b)
	return p.PPid, err == nil && p.State != 'Z'
}

// environ reads a process's environment from /proc.
func environ(t testing.TB, pid int) map[string]string {
	t.Helper()
	env := proctree.Environ("/proc", pid)
	if env == nil {
		t.Fatalf("cannot read the environment of pid %d", pid)
	}
	return env
}

// startScripted runs upgrader on a start script that first execs body, and
// returns once generation 1 is ready. Rewriting the script (writeScript)
// puts a new version on disk for the next upgrade.
func startScripted(t *testing.T, body string, args ...string) (p *proc, script, addr string) {
	t.Helper()
	script = filepath.Join(t.TempDir(), "run")
	writeScript(t, script, body)
	p = startUpgrader(t, append(append([]string{"-l", "127.0.0.1:0"}, args...), "--", script)...)
	addr = p.addr("")
	p.waitReady(1)
	return p, script, addr
}

// readyAt is when generation gen became ready, by the status.
func readyAt(t *testing.T, st supervise.Status, gen int) time.Time {
	t.Helper()
	g := genOf(st, gen)
	if g == nil || g.ReadyAt.IsZero() {
		t.Fatalf("generation %d has no ready time in the status %+v", gen, st)
	}
	return g.ReadyAt
}
