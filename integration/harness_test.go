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
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
	"github.com/seed6cb0314a/upgrader/internal/control"
	"github.com/seed6cb0314a/upgrader/supervise"
)

// Binaries built once by TestMain.
var (
	upgraderBin string
	helloBin    string
	repoRoot    string
)

func TestMain(m *testing.M) {
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
	// for benchmarks, whose figures would otherwise be the detector's.
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
}

// startUpgrader runs upgrader with args (JSON logs added) and returns once
// it has started; the test's cleanup kills it by pid if it still runs.
func startUpgrader(t testing.TB, args ...string) *proc {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command(upgraderBin, append([]string{"run", "--log-format", "json", "--log-level", "debug",
		"--control", filepath.Join(dir, "control.sock")}, args...)...)
	cmd.Dir = dir
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
		control: filepath.Join(dir, "control.sock")}
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
		// worker this upgrader started that is still its orphan.
		p.mu.Lock()
		for _, m := range p.logs {
			if m["msg"] == "worker started" {
				pid := int(m["pid"].(float64))
				if ppid, ok := parentOf(pid); ok && (ppid == 1 || ppid == p.pid) {
					syscall.Kill(pid, syscall.SIGKILL)
				}
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

// waitLog waits until a log entry satisfies match and returns it.
func (p *proc) waitLog(timeout time.Duration, what string, match func(map[string]any) bool) map[string]any {
	p.t.Helper()
	m, _ := p.waitLogFrom(0, timeout, what, match)
	return m
}

// waitLogFrom is waitLog over the entries from index from on; it also
// returns the entry's index. match must not call other proc methods.
func (p *proc) waitLogFrom(from int, timeout time.Duration, what string, match func(map[string]any) bool) (map[string]any, int) {
	p.t.Helper()
	deadline := time.Now().Add(timeout)
	timer := time.AfterFunc(timeout, func() { p.mu.Lock(); p.cond.Broadcast(); p.mu.Unlock() })
	defer timer.Stop()
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := from; ; {
		for ; i < len(p.logs); i++ {
			if match(p.logs[i]) {
				return p.logs[i], i
			}
		}
		select {
		case <-p.readerDone:
			p.mu.Unlock()
			defer p.mu.Lock()
			p.t.Fatalf("upgrader exited (%v) before logging %s", p.err, what)
		default:
		}
		if time.Now().After(deadline) {
			p.mu.Unlock()
			defer p.mu.Lock()
			p.t.Fatalf("no log of %s within %s", what, timeout)
		}
		p.cond.Wait()
	}
}

// msg matches a log entry by message and, optionally, integer fields.
func msg(text string, kv ...any) func(map[string]any) bool {
	return func(m map[string]any) bool {
		if m["msg"] != text {
			return false
		}
		for i := 0; i+1 < len(kv); i += 2 {
			want := kv[i+1]
			if n, ok := want.(int); ok {
				want = float64(n)
			}
			if m[kv[i].(string)] != want {
				return false
			}
		}
		return true
	}
}

// hasLog reports whether any entry so far matches.
func (p *proc) hasLog(match func(map[string]any) bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, m := range p.logs {
		if match(m) {
			return true
		}
	}
	return false
}

// addr waits for the "listening" entry of the listener named name (any, if
// empty) and returns its address.
func (p *proc) addr(name string) string {
	m := p.waitLog(10*time.Second, "listening "+name, func(m map[string]any) bool {
		return m["msg"] == "listening" && (name == "" || m["name"] == name)
	})
	return m["address"].(string)
}

func (p *proc) waitReady(gen int) {
	p.t.Helper()
	p.waitLog(30*time.Second, fmt.Sprintf("generation %d ready", gen), msg("generation ready", "generation", gen))
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

// runLoad runs loadgen in the background; the returned func waits for it.
func runLoad(cfg loadgen.Config) (stop func() loadgen.Result) {
	ctx, cancel := context.WithCancel(context.Background())
	if cfg.Duration == 0 {
		cfg.Duration = 2 * time.Minute // a bound, in case the test forgets to stop it
	}
	res := make(chan loadgen.Result, 1)
	go func() { res <- loadgen.Run(ctx, cfg) }()
	return func() loadgen.Result {
		cancel()
		return <-res
	}
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

// children lists the pids whose parent is pid, with their state letter.
func children(t testing.TB, pid int) map[int]string {
	t.Helper()
	out := map[int]string{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		var state string
		var ppid, self int
		fmt.Sscan(s[i+2:], &state, &ppid)
		fmt.Sscan(s, &self)
		if ppid == pid {
			out[self] = state
		}
	}
	return out
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
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, false
	}
	var state string
	var ppid int
	fmt.Sscan(s[i+2:], &state, &ppid)
	return ppid, state != "Z"
}

// environ reads a process's environment from /proc.
func environ(t testing.TB, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{}
	for _, kv := range strings.Split(string(b), "\x00") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
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

// tryStatus asks the running upgrader for its status over the control
// socket; status is the same, failing the test on error.
func (p *proc) tryStatus() (supervise.Status, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var st supervise.Status
	err := control.Do(ctx, p.control, control.Request{Command: "status"}, func(line []byte) error {
		return json.Unmarshal(line, &st)
	})
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
