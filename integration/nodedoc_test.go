package integration

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
	"github.com/seed6cb0314a/upgrader/supervise"
)

// The worker of these tests is written from docs/reference/node-ipc.md and
// worker-contract.md alone: if they pass, the spec is enough to write one.

// nodeDocWorker returns the node binary and the doc worker's path.
func nodeDocWorker(t *testing.T) (node, script string) {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatalf("node is needed for this test (.ci/run installs it): %v", err)
	}
	return node, filepath.Join(repoRoot, "integration/testdata/node-doc-worker.js")
}

// The drain deadline is beyond waitExited's 30 s, so that a generation
// gone within it left on its own: a Node.js worker whose channel kept it
// alive would be found, not killed at the deadline.
const nodeDrainTimeout = "60s"

func requireNoServerCloses(t *testing.T, r loadgen.Result) {
	t.Helper()
	if r.ServerCloses != 0 || r.ClosedUnderClient != 0 || r.IdleClosed != 0 {
		t.Fatalf("the server closed %d connections politely, %d under the client and %d while idle; want none",
			r.ServerCloses, r.ClosedUnderClient, r.IdleClosed)
	}
}

func TestNodeWorkerFromTheDocAlone(t *testing.T) {
	node, script := nodeDocWorker(t)
	p := startUpgrader(t, "--ipc", "node", "--drain-timeout", nodeDrainTimeout, "-l", "127.0.0.1:0", "-w", "2", "--", node, script)
	addr := p.addr("")
	r := upgradeUnderLoad(t, p, loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.KeepAlive, MaxIdle: 50 * time.Millisecond}, 10, 500*time.Millisecond)
	requireNoFailures(t, r)
	requireNoServerCloses(t, r)
	if r.ConnsAcrossGenerations < 16 || r.GenerationRegress != 0 {
		t.Fatalf("%d connections crossed generations (%d regressions); want all 16 clients' connections, moving forward only",
			r.ConnsAcrossGenerations, r.GenerationRegress)
	}
	requireGenerations(t, r, 1, 11)
	for gen := 1; gen <= 10; gen++ {
		p.waitExited(gen)
	}
	st := p.status()
	if st.Handoffs.HandedOff < 16 || st.Handoffs.Malformed != 0 {
		t.Fatalf("handoff counts %+v; want at least 16 handed off and nothing malformed", st.Handoffs)
	}
	t.Logf("handoffs: %+v", st.Handoffs)
}

// Go workers (UPGRADER_HANDOFF_FD) and Node.js ones (NODE_CHANNEL_FD)
// alternate under one upgrader: a connection goes from one channel to the
// other at every upgrade.
func TestMixedGoAndNodeWorkersHandOff(t *testing.T) {
	node, script := nodeDocWorker(t)
	wrapper := filepath.Join(t.TempDir(), "run")
	writeScript(t, wrapper, fmt.Sprintf(`if [ $((UPGRADER_GENERATION %% 2)) -eq 0 ]; then exec %s; fi
exec %s %s`, helloBin, node, script))
	p := startUpgrader(t, "--ipc", "node", "--drain-timeout", nodeDrainTimeout, "-l", "127.0.0.1:0", "--", wrapper)
	addr := p.addr("")
	p.waitReady(1)
	const clients = 16
	l := startLoad(loadgen.Config{Addr: addr, Clients: clients, Mode: loadgen.KeepAlive, MaxIdle: 50 * time.Millisecond})
	l.waitServed(t, 1, 100)
	runtimeOf := func(gen int) string { return map[bool]string{true: "Go", false: "Node"}[gen%2 == 0] }
	handedOff := func(st supervise.Status) int { return int(st.Handoffs.HandedOff) }
	before := handedOff(p.status())
	for gen := 2; gen <= 7; gen++ {
		// upgradeTo returns once the older generation has exited: no
		// connection was closed (checked below), so every one it held was
		// handed to this one.
		p.upgradeTo(gen)
		l.waitServed(t, gen, 100)
		after := handedOff(p.status())
		if after-before < clients {
			t.Errorf("upgrade %s (%d) → %s (%d) handed off %d connections; want all %d clients'",
				runtimeOf(gen-1), gen-1, runtimeOf(gen), gen, after-before, clients)
		}
		t.Logf("%s → %s: %d handed off", runtimeOf(gen-1), runtimeOf(gen), after-before)
		before = after
	}
	r := l.stop()
	requireNoFailures(t, r)
	requireNoServerCloses(t, r)
	// With no close at all, each client kept the one connection it opened
	// to generation 1 and took it through every generation to 7.
	if r.ConnsAcrossGenerations != clients || r.GenerationRegress != 0 {
		t.Fatalf("%d connections crossed generations (%d regressions); want each of the %d clients' one connection",
			r.ConnsAcrossGenerations, r.GenerationRegress, clients)
	}
	requireGenerations(t, r, 1, 7)
	if st := p.status(); st.Handoffs.Malformed != 0 {
		t.Fatalf("handoff counts %+v; want nothing malformed", st.Handoffs)
	}
}

// A Node.js worker whose connections nobody takes (the next generation
// does not accept handoffs) keeps them on the nak, thanks to keepOpen, and
// ends each the polite way on its next request.
func TestNodeWorkerServesRefusedHandoffsWithConnectionClose(t *testing.T) {
	node, script := nodeDocWorker(t)
	p, wrapper, addr := startScripted(t, "exec "+node+" "+script, "--ipc", "node", "--drain-timeout", nodeDrainTimeout)
	const clients = 16
	l := startLoad(loadgen.Config{Addr: addr, Clients: clients, Mode: loadgen.KeepAlive, MaxIdle: 50 * time.Millisecond})
	l.waitServed(t, 1, 100)
	writeScript(t, wrapper, "exec env -u UPGRADER_HANDOFF_FD "+helloBin)
	p.upgradeTo(2)
	l.waitServed(t, 2, 100)
	r := l.stop()
	requireNoFailures(t, r)
	if r.ServerCloses < clients || r.ClosedUnderClient != 0 || r.IdleClosed != 0 {
		t.Fatalf("%d polite closes, %d under the client, %d while idle; want every client's connection closed politely",
			r.ServerCloses, r.ClosedUnderClient, r.IdleClosed)
	}
	if st := p.status(); st.Handoffs.HandedOff != 0 || st.Handoffs.Refused < clients || st.Handoffs.Malformed != 0 {
		t.Fatalf("handoff counts %+v; want every connection refused and none handed off", st.Handoffs)
	}
}
