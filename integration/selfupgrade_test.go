package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
	"github.com/seed6cb0314a/upgrader/internal/control"
	"github.com/seed6cb0314a/upgrader/supervise"
)

// A second build of upgrader that reports version "v2", built once.
var (
	v2Once sync.Once
	v2Bin  string
	v2Err  error
)

func upgraderV2(t *testing.T) string {
	t.Helper()
	v2Once.Do(func() {
		v2Bin = filepath.Join(filepath.Dir(upgraderBin), "upgrader-v2")
		cmd := exec.Command("go", "build", "-race", "-ldflags", "-X main.version=v2", "-o", v2Bin, "./cmd/upgrader")
		cmd.Dir, cmd.Stderr = repoRoot, os.Stderr
		v2Err = cmd.Run()
	})
	if v2Err != nil {
		t.Fatalf("build upgrader v2: %v", v2Err)
	}
	return v2Bin
}

// installBin puts a copy of src at dst through a rename, as a deploy does
// (the running image's file cannot be written in place).
func installBin(t testing.TB, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	tmp := dst + ".tmp"
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	out.Close()
	if err := os.Rename(tmp, dst); err != nil {
		t.Fatal(err)
	}
}

// startSelfUpgradable starts upgrader from its own copy of the binary, which
// the test replaces before each self-upgrade; it returns that path.
func startSelfUpgradable(t testing.TB, args ...string) (*proc, string) {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "upgrader")
	installBin(t, upgraderBin, bin)
	ctl := filepath.Join(dir, "control.sock")
	cmd := exec.Command(bin, append([]string{"run", "--log-format", "json", "--log-level", "debug", "--control", ctl}, args...)...)
	cmd.Dir = dir
	return startProc(t, cmd, ctl), bin
}

// selfUpgrade runs `upgrader upgrade --self[-only]` and returns its output
// and error.
func (p *proc) selfUpgrade(only bool) (string, error) {
	flag := "--self"
	if only {
		flag = "--self-only"
	}
	out, err := exec.Command(upgraderBin, "upgrade", flag, "--control", p.control, "--timeout", "60s").CombinedOutput()
	return string(out), err
}

// selfUpgradeEvents asks for a self-upgrade (--self-only when only) over
// the control socket, as upgrader upgrade does, and returns the progress
// events it streams until the end: the old image's, then the new one's on
// the same connection.
func (p *proc) selfUpgradeEvents(only bool) ([]supervise.Progress, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var evs []supervise.Progress
	req := control.Request{Command: "upgrade", Wait: true, Self: true, SelfOnly: only}
	err := control.Do(ctx, p.control, req, func(line []byte) error {
		var e supervise.Progress
		if err := json.Unmarshal(line, &e); err != nil {
			return fmt.Errorf("progress %q: %w", line, err)
		}
		evs = append(evs, e)
		return nil
	})
	return evs, err
}

// events lists the events' names, in order.
func events(evs []supervise.Progress) []string {
	var names []string
	for _, e := range evs {
		names = append(names, string(e.Event))
	}
	return names
}

func zombies(t testing.TB, pid int) []int {
	var z []int
	for c, st := range children(t, pid) {
		if st == "Z" {
			z = append(z, c)
		}
	}
	return z
}

func TestSelfUpgradeUnderLoad(t *testing.T) {
	v2 := upgraderV2(t)
	p, bin := startSelfUpgradable(t, "-l", "127.0.0.1:0", "-w", "2", "--health", "127.0.0.1:0", "--", helloBin)
	p.waitReady(1)
	addr := p.addr("")
	workers := p.workerPids(1)
	stopHealth := pollReadyz(p.healthAddr())
	n := 0
	for _, mode := range []loadgen.Mode{loadgen.NewConn, loadgen.KeepAlive} {
		l := startLoad(loadgen.Config{Addr: addr, Clients: 16, Mode: mode})
		for i := 0; i < 5; i++ {
			n++
			src, want := v2, "v2"
			if n%2 == 0 {
				src, want = upgraderBin, "dev"
			}
			installBin(t, src, bin)
			if out, err := p.selfUpgrade(true); err != nil {
				t.Fatalf("self-upgrade %d: %v\n%s", n, err, out)
			}
			st := p.status()
			if st.Pid != p.pid || st.Version != want || st.Execs != n {
				t.Fatalf("after self-upgrade %d: pid %d version %q execs %d, want pid %d version %q execs %d", n, st.Pid, st.Version, st.Execs, p.pid, want, n)
			}
			if got := p.workerPids(1); fmt.Sprint(got) != fmt.Sprint(workers) {
				t.Fatalf("after self-upgrade %d: workers %v, want the same %v", n, got, workers)
			}
			l.waitServed(t, 1, 50)
		}
		r := l.stop()
		requireNoFailures(t, r)
		if mode == loadgen.KeepAlive && (r.ClosedUnderClient != 0 || r.IdleClosed != 0 || r.ServerCloses != 0) {
			t.Fatalf("keep-alive: the server closed connections: %s", r)
		}
	}
	// Without --self-only the workers are upgraded too.
	l := startLoad(loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.KeepAlive})
	installBin(t, v2, bin)
	if out, err := p.selfUpgrade(false); err != nil {
		t.Fatalf("self-upgrade with workers: %v\n%s", err, out)
	}
	st := p.waitReady(2)
	if st.Version != "v2" || st.Pid != p.pid {
		t.Fatalf("after self-upgrade with workers: %+v", st)
	}
	requireNoFailures(t, l.stop())
	if polls, err := stopHealth(); err != nil || polls == 0 {
		t.Fatalf("/readyz during the self-upgrades: %d polls answered 200, then %v", polls, err)
	} else {
		t.Logf("/readyz answered 200 to all %d polls during the self-upgrades", polls)
	}
	if z := zombies(t, p.pid); len(z) > 0 {
		t.Fatalf("zombies below upgrader: %v", z)
	}
}

// pollReadyz asks http://addr/readyz over a new connection every few
// milliseconds until stop is called, which returns how many polls answered
// 200 and the first failure (connection refused, a timeout, another code):
// the health listener is carried across the exec, so it must never refuse.
func pollReadyz(addr string) (stop func() (int, error)) {
	c := http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	quit, done := make(chan struct{}), make(chan struct{})
	var polls int
	var failure error
	go func() {
		defer close(done)
		for {
			select {
			case <-quit:
				return
			default:
			}
			resp, err := c.Get("http://" + addr + "/readyz")
			if err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					err = fmt.Errorf("status %d", resp.StatusCode)
				}
			}
			if err != nil {
				failure = fmt.Errorf("at %.3f: %w", float64(time.Now().UnixNano())/1e9, err)
				return
			}
			polls++
			time.Sleep(2 * time.Millisecond) // polling interval
		}
	}()
	return func() (int, error) {
		close(quit)
		<-done
		return polls, failure
	}
}

func TestSelfUpgradeRefused(t *testing.T) {
	p, bin := startSelfUpgradable(t, "-l", "127.0.0.1:0", "--", helloBin)
	p.waitReady(1)
	l := startLoad(loadgen.Config{Addr: p.addr(""), Clients: 16, Mode: loadgen.NewConn})
	for _, c := range []struct{ name, script, reason string }{
		{"missing", "", "no such file"},
		{"exits 1", "exit 1", "exited with status 1"},
		{"hangs", "sleep 100", "did not finish"},
		{"wrong state version", "echo upgrader-self-check state-version 99 version x", "state version 99"},
	} {
		os.Remove(bin)
		if c.script != "" {
			writeScript(t, bin, c.script)
		}
		out, err := p.selfUpgrade(true)
		if err == nil || !contains(out, c.reason) {
			t.Fatalf("%s: upgrade --self: %v, output %q; want a failure naming %q", c.name, err, out, c.reason)
		}
		st := p.status()
		if st.Execs != 0 || !st.Ready || st.SelfUpgrade == nil || st.SelfUpgrade.OK {
			t.Fatalf("%s: status after the refusal: %+v", c.name, st)
		}
		l.waitServed(t, 1, 20)
	}
	requireNoFailures(t, l.stop())
}

func contains(s, sub string) bool {
	return len(sub) == 0 || (len(s) >= len(sub) && indexOf(s, sub) >= 0)
}

func indexOf(s, sub string) int {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return i
		}
	}
	return -1
}

func TestSelfUpgradeFDsFlat(t *testing.T) {
	p, _ := startSelfUpgradable(t, "-l", "127.0.0.1:0", "--health", "127.0.0.1:0", "--", helloBin)
	p.waitReady(1)
	if out, err := p.selfUpgrade(true); err != nil { // settle once
		t.Fatalf("self-upgrade: %v\n%s", err, out)
	}
	p.waitSpares(1)
	before := countFDs(t, p.pid)
	for i := 0; i < 20; i++ {
		if out, err := p.selfUpgrade(true); err != nil {
			t.Fatalf("self-upgrade %d: %v\n%s", i, err, out)
		}
	}
	p.waitStatus(10*time.Second, "21 execs", func(st supervise.Status) bool { return st.Execs == 21 })
	p.waitSpares(1)
	if after := countFDs(t, p.pid); after != before {
		t.Fatalf("upgrader fds: %d before 20 self-upgrades, %d after", before, after)
	}
	if z := zombies(t, p.pid); len(z) > 0 {
		t.Fatalf("zombies below upgrader: %v", z)
	}
}

// Pending timers carry across the exec with their time left: generation 1,
// whose worker ignores the drain signal, is SIGKILLed at its drain deadline
// by the new image.
func TestSelfUpgradeKeepsTheDrainDeadline(t *testing.T) {
	marks := t.TempDir()
	worker, script := filepath.Join(marks, "worker.py"), filepath.Join(marks, "run")
	if err := os.WriteFile(worker, []byte(hurryWorker), 0o644); err != nil {
		t.Fatal(err)
	}
	// ignore-all: the worker catches every signal it can (marking each) and
	// never exits, so that only a SIGKILL ends it.
	writeScript(t, script, "exec python3 "+worker+" "+marks+" ignore-all")
	p, bin := startSelfUpgradable(t, "-l", "127.0.0.1:0", "--drain-timeout", "3s", "--", script)
	p.waitReady(1)
	victim := p.workerPids(1)[0]
	p.signal(syscall.SIGUSR2)
	p.waitReady(2)
	waitHurryMark(t, marks, "gen1-term1") // draining, and ignoring it
	installBin(t, upgraderBin, bin)
	if out, err := p.selfUpgrade(true); err != nil {
		t.Fatalf("self-upgrade: %v\n%s", err, out)
	}
	// The self-upgrade is over (the new image has resumed) with generation
	// 1 still draining: whatever ends it now, the new image does.
	if st := p.status(); st.Execs != 1 || genOf(st, 1) == nil {
		t.Fatalf("after the self-upgrade: execs %d, generation 1 %+v; want 1 exec and generation 1 still draining", st.Execs, genOf(st, 1))
	}
	if _, alive := parentOf(victim); !alive {
		t.Fatalf("generation 1's worker %d is gone before the new image took over", victim)
	}
	gen1Gone(t, p)
	waitGone(t, victim, 10*time.Second)
	// Gone, without exiting by itself and without having caught any signal
	// but the drain signal: a SIGKILL ended it.
	if hurryMarked(marks, "gen1-exited") {
		t.Fatal("generation 1's worker exited by itself; it ignores the drain signal")
	}
	if caught := hurryCaught(t, marks, "gen1"); len(caught) > 0 {
		t.Fatalf("generation 1's worker caught %v besides the drain signal; want it ended by SIGKILL", caught)
	}
	if st := p.status(); st.Execs != 1 || !st.Ready {
		t.Fatalf("status after the drain deadline: %+v", st)
	}
}

// A self-upgrade asked for while a worker upgrade starts waits for it; that
// upgrade's workers never become ready, so it fails at its ready timeout,
// which is reported, generation 1 serves on, and the self-upgrade follows.
func TestSelfUpgradeBehindAFailingUpgrade(t *testing.T) {
	script := filepath.Join(t.TempDir(), "run")
	writeScript(t, script, "exec "+helloBin)
	p, bin := startSelfUpgradable(t, "-l", "127.0.0.1:0", "--ready-timeout", "3s", "--", script)
	p.waitReady(1)
	l := startLoad(loadgen.Config{Addr: p.addr(""), Clients: 8, Mode: loadgen.NewConn})
	writeScript(t, script, "exec sleep 1000")
	p.signal(syscall.SIGUSR2)
	p.waitStatus(10*time.Second, "generation 2 starting", func(st supervise.Status) bool { return genOf(st, 2) != nil })
	installBin(t, upgraderBin, bin)
	evs, err := p.selfUpgradeEvents(true)
	if names := events(evs); err != nil || len(names) == 0 || names[0] != "queued" || evs[0].Generation != 2 ||
		!slices.Contains(names, "resumed") || names[len(names)-1] != "done" || slices.Contains(names, "failed") {
		t.Fatalf("self-upgrade behind the upgrade: %v, events %+v; want it queued behind generation 2, then resumed and done", err, evs)
	}
	st := p.waitExited(2)
	if st.LastUpgrade == nil || st.LastUpgrade.OK || st.LastUpgrade.Generation != 2 || st.Upgrades["failed"] != 1 {
		t.Fatalf("the failed upgrade is not reported: last %+v, upgrades %v", st.LastUpgrade, st.Upgrades)
	}
	if st.Current != 1 || !st.Ready || st.Execs != 1 {
		t.Fatalf("after the failed upgrade and the self-upgrade: current %d ready %v execs %d, want 1 true 1", st.Current, st.Ready, st.Execs)
	}
	l.waitServed(t, 1, 50)
	requireNoFailures(t, l.stop())
}

// BenchmarkSelfUpgrade does b.N self-upgrades (--self-only, the same
// binary) under light keep-alive load and reports upgrader's fds and RSS
// before and after, and the time of one self-upgrade as its client sees it:
//
//	go test -run '^$' -bench BenchmarkSelfUpgrade -benchtime=100x ./integration/
//
// No request fails, the fds are the same after, and no child is a zombie.
func BenchmarkSelfUpgrade(b *testing.B) {
	p, _ := startSelfUpgradable(b, "-l", "127.0.0.1:0", "-w", "2", "--health", "127.0.0.1:0", "--", helloBin)
	p.waitReady(1)
	l := startLoad(loadgen.Config{Addr: p.addr(""), Clients: 4, Mode: loadgen.KeepAlive, Duration: time.Hour})
	if out, err := p.selfUpgrade(true); err != nil { // settle once
		b.Fatalf("self-upgrade: %v\n%s", err, out)
	}
	p.waitSpares(2)
	fds, rss := countFDs(b, p.pid), rssKiB(b, p.pid)
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		if out, err := p.selfUpgrade(true); err != nil {
			b.Fatalf("self-upgrade %d: %v\n%s", i, err, out)
		}
	}
	elapsed := time.Since(start)
	b.StopTimer()
	p.waitStatus(10*time.Second, "every exec counted", func(st supervise.Status) bool { return st.Execs == b.N+1 })
	p.waitSpares(2)
	fdsAfter, rssAfter := countFDs(b, p.pid), rssKiB(b, p.pid)
	r := l.stop()
	b.ReportMetric(float64(elapsed.Milliseconds())/float64(b.N), "ms/self-upgrade")
	b.ReportMetric(float64(fds), "fds-before")
	b.ReportMetric(float64(fdsAfter), "fds-after")
	b.ReportMetric(float64(rss)/1024, "rss-before-MiB")
	b.ReportMetric(float64(rssAfter)/1024, "rss-after-MiB")
	b.ReportMetric(float64(r.Requests), "requests")
	requireNoFailures(b, r)
	if fdsAfter != fds {
		b.Fatalf("upgrader fds: %d before %d self-upgrades, %d after", fds, b.N, fdsAfter)
	}
	if z := zombies(b, p.pid); len(z) > 0 {
		b.Fatalf("zombies below upgrader: %v", z)
	}
}
