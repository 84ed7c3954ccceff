package integration

import (
	"fmt"
	"path/filepath"
	"testing"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
)

// TestSelfUpgradeKeepsTheNodeChannel: Node.js workers' IPC channels are
// carried across self-upgrades of upgrader, so that after three of them the
// same workers still hand their idle connections to the next generation
// over the channels the first image opened.
func TestSelfUpgradeKeepsTheNodeChannel(t *testing.T) {
	p, _ := startSelfUpgradable(t, "--ipc", "node", "-l", "127.0.0.1:0", "-w", "2", "--",
		"node", filepath.Join(repoRoot, "examples/node/server.js"))
	p.waitReady(1)
	workers := p.workerPids(1)
	l := startLoad(loadgen.Config{Addr: p.addr(""), Clients: 16, Mode: loadgen.KeepAlive})
	l.waitServed(t, 1, 50)
	for i := 1; i <= 3; i++ {
		if out, err := p.selfUpgrade(true); err != nil {
			t.Fatalf("self-upgrade %d: %v\n%s", i, err, out)
		}
		if got := p.workerPids(1); fmt.Sprint(got) != fmt.Sprint(workers) {
			t.Fatalf("after self-upgrade %d: workers %v, want the same %v", i, got, workers)
		}
		l.waitServed(t, 1, 50)
	}
	p.upgradeTo(2)
	l.waitServed(t, 2, 50)
	r := l.stop()
	requireNoFailures(t, r)
	if r.ClosedUnderClient != 0 || r.IdleClosed != 0 || r.ServerCloses != 0 {
		t.Fatalf("the server closed connections: %s", r)
	}
	st := p.status()
	if st.Execs != 3 || st.Handoffs.HandedOff < 16 || st.Handoffs.Malformed != 0 {
		t.Fatalf("execs %d, handoffs %+v; want 3 execs and the 16 clients' connections handed off", st.Execs, st.Handoffs)
	}
	if r.ConnsAcrossGenerations < 16 {
		t.Fatalf("%d connections answered by both generations, want 16", r.ConnsAcrossGenerations)
	}
	t.Logf("%s; handoffs %+v", r, st.Handoffs)
}
