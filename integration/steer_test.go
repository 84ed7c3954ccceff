package integration

import (
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
)

var (
	plainOnce sync.Once
	plainBin  string
	plainErr  error
)

// buildPlainHTTP builds integration/cmd/plainhttp once, next to hello.
func buildPlainHTTP(t testing.TB) string {
	plainOnce.Do(func() {
		plainBin = filepath.Join(filepath.Dir(helloBin), "plainhttp")
		cmd := exec.Command("go", "build", "-o", plainBin, "./integration/cmd/plainhttp")
		cmd.Dir = repoRoot
		out, err := cmd.CombinedOutput()
		if err != nil {
			plainErr = err
			t.Logf("%s", out)
		}
	})
	if plainErr != nil {
		t.Fatal("build plainhttp:", plainErr)
	}
	return plainBin
}

// plainUpgrades runs the unchanged Go server (Serve on fd 3, Shutdown on
// SIGTERM) under upgrader with args, through n upgrades interval apart
// under 16 clients with a new connection per request, and returns the
// load's result.
func plainUpgrades(t testing.TB, n int, interval time.Duration, args ...string) loadgen.Result {
	bin := buildPlainHTTP(t)
	p := startUpgrader(t, append(append([]string{"-l", "127.0.0.1:0", "--ready-hold", "0"}, args...), "--", bin)...)
	p.waitReady(1)
	l := startLoad(loadgen.Config{Addr: p.addr(""), Clients: 16, Mode: loadgen.NewConn})
	for i := range n {
		time.Sleep(interval) // each generation serves the load this long
		p.signal(syscall.SIGUSR2)
		p.waitReady(i + 2)
	}
	l.waitServed(t, n+1, 50) // the newest generation serves the load
	r := l.stop()
	if code := p.stop(syscall.SIGTERM, 30*time.Second); code != 0 {
		t.Fatalf("graceful stop exited %d, want 0", code)
	}
	return r
}

// TestUnchangedGoServerUpgrades: a server that calls http.Server.Shutdown
// on SIGTERM loses the connections it accepts once Shutdown has begun,
// and those left in the shared accept queue; with a listener per
// generation, new connections go to the new generation's socket before
// the old one is asked to stop, and none is lost.
func TestUnchangedGoServerUpgrades(t *testing.T) {
	r := plainUpgrades(t, 20, 500*time.Millisecond)
	requireNoFailures(t, r)
	requireGenerations(t, r, 1, 21)
}

// BenchmarkUnchangedGoServer prints the failed requests of the unchanged Go
// server across 20 upgrades 0.5 s apart (16 clients, a new connection per
// request), with a listener per generation (and its grace, and without
// the grace: the old generation drained as soon as its queue is empty) and
// without (one shared socket).
func BenchmarkUnchangedGoServer(b *testing.B) {
	for _, c := range []struct {
		name string
		args []string
	}{
		{"per-generation", nil},
		{"per-generation-grace-0", []string{"--steer-grace", "0"}},
		{"shared", []string{"--listener-per-generation=false"}},
	} {
		b.Run(c.name, func(b *testing.B) {
			var failed, reqs int
			for range b.N {
				r := plainUpgrades(b, 20, 500*time.Millisecond, c.args...)
				failed += r.Failed()
				reqs += r.Requests
			}
			b.ReportMetric(float64(failed)/float64(b.N), "failed/run")
			b.ReportMetric(float64(reqs)/float64(b.N), "requests/run")
		})
	}
}

// TestUnchangedGoServerAcrossSelfUpgrade: the per-generation sockets and
// the mirror of the reuseport group are carried across a self-upgrade, so
// that the upgrades after it lose nothing either.
func TestUnchangedGoServerAcrossSelfUpgrade(t *testing.T) {
	bin := buildPlainHTTP(t)
	p, _ := startSelfUpgradable(t, "-l", "127.0.0.1:0", "--ready-hold", "0", "--", bin)
	p.waitReady(1)
	l := startLoad(loadgen.Config{Addr: p.addr(""), Clients: 16, Mode: loadgen.NewConn})
	upgrade := func(gen int) {
		time.Sleep(300 * time.Millisecond) // each generation serves the load this long
		p.signal(syscall.SIGUSR2)
		p.waitReady(gen)
		l.waitServed(t, gen, 50)
	}
	upgrade(2)
	upgrade(3)
	if out, err := p.selfUpgrade(true); err != nil {
		t.Fatalf("self-upgrade: %v\n%s", err, out)
	}
	l.waitServed(t, 3, 50)
	for gen := 4; gen <= 6; gen++ {
		upgrade(gen)
	}
	r := l.stop()
	requireNoFailures(t, r)
	requireGenerations(t, r, 1, 6)
	if log := p.tail(100000); strings.Contains(log, "listener per generation off") {
		t.Fatalf("the reuseport group was lost across the self-upgrade:\n%s", log)
	}
	if code := p.stop(syscall.SIGTERM, 30*time.Second); code != 0 {
		t.Fatalf("graceful stop exited %d, want 0", code)
	}
}
