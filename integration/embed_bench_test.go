package integration

import (
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
)

var (
	bareflipOnce sync.Once
	bareflipBin  string
	bareflipErr  error
)

// buildBareflip builds integration/cmd/bareflip once, next to hello.
func buildBareflip(t testing.TB) string {
	bareflipOnce.Do(func() {
		bareflipBin = filepath.Join(filepath.Dir(helloBin), "bareflip")
		cmd := exec.Command("go", "build", "-o", bareflipBin, "./integration/cmd/bareflip")
		cmd.Dir = repoRoot
		out, err := cmd.CombinedOutput()
		if err != nil {
			bareflipErr = err
			t.Logf("%s", out)
		}
	})
	if bareflipErr != nil {
		t.Fatal("build bareflip:", bareflipErr)
	}
	return bareflipBin
}

// BenchmarkEmbedVsTableflip runs the same load through 20 upgrades, 0.5 s
// apart, 16 clients, against a bare tableflip server (tableflip's
// documented usage with srv.Shutdown: integration/cmd/bareflip) and against
// examples/hello in embedded mode, with a new connection per request and
// with keep-alive connections idling up to 50 ms, and reports the failed
// requests and the connections the server closed side by side.
//
//	go test -run '^$' -bench EmbedVsTableflip -benchtime 1x ./integration
func BenchmarkEmbedVsTableflip(b *testing.B) {
	bare := buildBareflip(b)
	for i := 0; i < b.N; i++ {
		for _, mode := range []loadgen.Mode{loadgen.NewConn, loadgen.KeepAlive} {
			for _, srv := range []struct{ name, bin, flag string }{{"tableflip", bare, ""}, {"embedded", helloBin, "-upgrades"}} {
				var e *embedded
				if srv.flag != "" {
					e = startFlip(b, srv.bin, srv.flag)
				} else {
					e = startFlip(b, srv.bin)
				}
				addr := waitListening(b, e.current())
				r := runEmbeddedUpgrades(b, e, addr, mode, 20, 500*time.Millisecond)
				b.Logf("%s, %s: %s; server closed %d (Connection: close), %d under the client, %d idle",
					srv.name, mode, r, r.ServerCloses, r.ClosedUnderClient, r.IdleClosed)
				b.ReportMetric(float64(r.Failed()), "failed-"+srv.name+"-"+string(mode))
				if mode == loadgen.KeepAlive {
					b.ReportMetric(float64(r.ServerCloses+r.ClosedUnderClient+r.IdleClosed), "closed-"+srv.name+"-"+string(mode))
					b.ReportMetric(float64(r.ConnsAcrossGenerations), "conns-across-gens-"+srv.name)
				}
			}
		}
	}
}

// BenchmarkEmbedUpgrade times one embedded upgrade (SIGUSR2 to the old
// process gone, the new one ready), idle, and checks the fd count of the
// serving process stays flat over b.N upgrades.
//
//	go test -run '^$' -bench EmbedUpgrade -benchtime 100x ./integration
func BenchmarkEmbedUpgrade(b *testing.B) {
	e := startEmbedded(b)
	p := e.upgrade()
	base := stableFDs(b, p)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		p = e.upgrade()
	}
	b.StopTimer()
	got := stableFDs(b, p)
	if got != base {
		b.Fatalf("fds after %d upgrades: %d, was %d", b.N, got, base)
	}
	if z := zombies(b, p); len(z) > 0 {
		b.Fatalf("zombies: %v", z)
	}
	b.ReportMetric(float64(got), "fds")
}
