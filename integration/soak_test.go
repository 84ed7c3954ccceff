package integration

import (
	"flag"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
)

var soak = flag.Int("soak", 30, "upgrades in TestSoakUpgrades (1000 for the long soak)")

// TestSoakUpgrades upgrades every 50 ms under keep-alive load, -soak times
// (30 in the default run; the long soak is 1000):
//
//	go test -race -run TestSoakUpgrades -timeout 30m ./integration -soak=1000
//
// Zero failed requests; the supervisor's fds the same at the end as after
// the first upgrade (but for the generations' own listening sockets, at
// most one per generation alive at once), its RSS printed every 100 upgrades; no zombies.
func TestSoakUpgrades(t *testing.T) { soakUpgrades(t) }

type soakFigures struct{ firstFDs, lastFDs, firstRSS, lastRSS, requests int }

// BenchmarkSoakUpgrades is the same soak with upgrader built without the
// race detector, whose own memory would otherwise be in the RSS figures:
//
//	go test -run '^$' -bench SoakUpgrades -benchtime 1x -timeout 30m ./integration -soak=1000
func BenchmarkSoakUpgrades(b *testing.B) {
	for i := 0; i < b.N; i++ {
		f := soakUpgrades(b)
		b.ReportMetric(float64(f.firstFDs), "fds-first")
		b.ReportMetric(float64(f.lastFDs), "fds-last")
		b.ReportMetric(float64(f.firstRSS)/1024, "rss-first-MiB")
		b.ReportMetric(float64(f.lastRSS)/1024, "rss-last-MiB")
		b.ReportMetric(float64(f.requests), "requests")
	}
}

func soakUpgrades(t testing.TB) soakFigures {
	p := startUpgrader(t, "-l", "127.0.0.1:0", "-l", "unix://"+filepath.Join(t.TempDir(), "s.sock"), "--workers", "2", "--", helloBin)
	addr := p.addr("tcp-127.0.0.1-0")
	p.waitReady(1)
	l := startLoad(loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.KeepAlive, MaxIdle: 50 * time.Millisecond, Duration: time.Hour})
	p.upgradeTo(2)
	p.waitSpares(2)
	firstFDs, firstRSS := countFDs(t, p.pid), rssKiB(t, p.pid)
	firstPool := len(listeningAddrs(p.pid))
	next := time.Now()
	for gen := 3; gen <= *soak+1; gen++ {
		next = next.Add(50 * time.Millisecond)
		time.Sleep(time.Until(next)) // the pace of upgrades, not synchronization
		p.signal(syscall.SIGUSR2)
		p.waitReady(gen)
		if gen%250 == 0 {
			t.Logf("generation %d: supervisor fds %d, RSS %d KiB", gen, countFDs(t, p.pid), rssKiB(t, p.pid))
		}
	}
	r := l.stop()
	p.upgradeTo(*soak + 2) // every older generation exited
	p.waitSpares(2)
	lastFDs, lastRSS := countFDs(t, p.pid), rssKiB(t, p.pid)
	lastPool := len(listeningAddrs(p.pid))
	t.Logf("%d upgrades: supervisor fds %d → %d (TCP listening sockets %d → %d), RSS %d → %d KiB", *soak, firstFDs, lastFDs, firstPool, lastPool, firstRSS, lastRSS)
	requireNoFailures(t, r)
	// The generations' own sockets are kept for later generations, one for
	// each generation alive at once (the current one, one starting, and at
	// most --max-draining (4) draining), with the listener's own, idle once
	// generation 1 has gone. Everything else stays flat.
	if lastPool > 7 {
		t.Errorf("supervisor holds %d listening TCP sockets after the soak, want at most 7 (one per generation alive at once, and the listener's)", lastPool)
	}
	if lastFDs-lastPool != firstFDs-firstPool {
		t.Fatalf("supervisor fds other than its listening TCP sockets: %d after the soak, %d after the first upgrade", lastFDs-lastPool, firstFDs-firstPool)
	}
	for pid, st := range children(t, p.pid) {
		if st == "Z" {
			t.Errorf("zombie child %d", pid)
		}
	}
	if code := p.stop(syscall.SIGTERM, 60*time.Second); code != 0 {
		t.Fatalf("graceful stop exited %d", code)
	}
	return soakFigures{firstFDs, lastFDs, firstRSS, lastRSS, r.Requests}
}
