package integration

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
	"github.com/seed6cb0314a/upgrader/supervise"
)

func TestHandoffKeepsKeepAliveConnectionsOpen(t *testing.T) {
	p := startUpgrader(t, "-l", "127.0.0.1:0", "-w", "2", "--", helloBin)
	addr := p.addr("")
	r := upgradeUnderLoad(t, p, loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.KeepAlive, MaxIdle: 50 * time.Millisecond}, 20, 500*time.Millisecond)
	requireNoFailures(t, r)
	requireConnectionsCarried(t, r, 16)
	requireGenerations(t, r, 1, 21)
	st := p.status()
	if st.Handoffs.HandedOff < 16 || st.Handoffs.Malformed != 0 {
		t.Fatalf("handoff counts %+v", st.Handoffs)
	}
	t.Logf("handoffs: %+v", st.Handoffs)
}

// requireConnectionsCarried fails t unless no connection of r was closed
// (politely, under a client or while idle) and all clients' connections
// were answered by newer and newer generations: handed off at every
// upgrade.
func requireConnectionsCarried(t *testing.T, r loadgen.Result, clients int) {
	t.Helper()
	if r.ServerCloses != 0 || r.ClosedUnderClient != 0 || r.IdleClosed != 0 {
		t.Fatalf("the server closed %d connections politely, %d under the client and %d while idle; want none", r.ServerCloses, r.ClosedUnderClient, r.IdleClosed)
	}
	if r.ConnsAcrossGenerations < clients || r.GenerationRegress != 0 {
		t.Fatalf("%d connections crossed generations (%d regressions); want all %d clients' connections, moving forward only",
			r.ConnsAcrossGenerations, r.GenerationRegress, clients)
	}
}

// rawPost sends one POST on c and returns the status and X-Generation.
func rawPost(t *testing.T, c net.Conn, br *bufio.Reader) (int, string, bool) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")); err != nil {
		t.Fatalf("write: %v", err)
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	resp.Body.Close()
	return resp.StatusCode, resp.Header.Get("X-Generation"), resp.Close
}

// helloConn starts upgrader with examples/hello and opens a connection to
// generation 1.
func helloConn(t *testing.T) (*proc, net.Conn, *bufio.Reader) {
	t.Helper()
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--", helloBin)
	addr := p.addr("")
	p.waitReady(1)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return p, c, bufio.NewReader(c)
}

func TestIdleConnectionSurvivesFiveUpgrades(t *testing.T) {
	p, c, br := helloConn(t)
	if code, gen, _ := rawPost(t, c, br); code != 200 || gen != "1" {
		t.Fatalf("first request: %d from generation %s", code, gen)
	}
	for gen := 2; gen <= 6; gen++ {
		p.upgradeTo(gen)
	}
	code, gen, closing := rawPost(t, c, br)
	if code != 200 || gen != "6" || closing {
		t.Fatalf("POST after 5 upgrades on the idle connection: %d from generation %s (close=%v); want 200 from 6", code, gen, closing)
	}
}

func TestStatefulSessionSurvivesUpgrades(t *testing.T) {
	counterBin := filepath.Join(filepath.Dir(helloBin), "counter")
	build := exec.Command("go", "build", "-o", counterBin, "./examples/counter")
	build.Dir = repoRoot
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build counter: %v\n%s", err, out)
	}
	p := startUpgrader(t, "-l", "counter=127.0.0.1:0", "--", counterBin)
	addr := p.addr("counter")
	p.waitReady(1)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	want := 0
	lastGen := 0
	inc := func() {
		t.Helper()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "inc\n")
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("after %d: %v", want, err)
		}
		want++
		var n, pid, gen int
		if _, err := fmt.Sscanf(line, "%d pid=%d generation=%d", &n, &pid, &gen); err != nil || n != want || gen < lastGen {
			t.Fatalf("reply %q, want counter %d from generation ≥ %d", line, want, lastGen)
		}
		lastGen = gen
	}
	for gen := 2; gen <= 6; gen++ {
		for range 20 {
			inc()
		}
		// Half a line in flight as the drain begins travels with the session.
		fmt.Fprintf(c, "in")
		p.upgradeTo(gen)
		fmt.Fprintf(c, "c\n")
		want++
		line, err := br.ReadString('\n')
		if err != nil || !strings.HasPrefix(line, strconv.Itoa(want)+" ") || !strings.HasSuffix(line, "generation="+strconv.Itoa(gen)+"\n") {
			t.Fatalf("after upgrade to %d: %q %v; want counter %d from generation %d", gen, line, err, want, gen)
		}
		lastGen = gen
	}
	t.Logf("counter reached %d across 5 upgrades on one connection", want)
}

func TestHalfRequestAtDrainGetsItsResponse(t *testing.T) {
	p, c, br := helloConn(t)
	rawPost(t, c, br)
	old := p.workerPids(1)[0]
	// Half a request, read by the worker; then the upgrade, until the
	// worker has begun its drain (it stopped accepting); then the rest.
	c.Write([]byte("POST / HTTP/1.1\r\nHost: x\r\nContent-"))
	waitConsumed(t, c, old)
	p.signal(syscall.SIGUSR2)
	p.waitReady(2)
	waitNotListening(t, old)
	c.Write([]byte("Length: 5\r\n\r\nhello"))
	c.SetDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("the half-sent request got no response: %v", err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	// Its bytes were in the old worker's buffers, so the connection could
	// not be handed off: it ends the polite way, and the old generation
	// is free to go (docs/draining.md).
	if resp.StatusCode != 200 || !resp.Close || resp.Header.Get("X-Generation") != "1" {
		t.Fatalf("status %d from generation %s, close=%v; want 200 from 1 with Connection: close",
			resp.StatusCode, resp.Header.Get("X-Generation"), resp.Close)
	}
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("after Connection: close: %v, want EOF", err)
	}
	p.waitExited(1)
}

func TestNewGenerationWithoutHandoffDrainsByConnectionClose(t *testing.T) {
	p, script, addr := startScripted(t, "exec "+helloBin)
	l := startLoad(loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.KeepAlive, MaxIdle: 50 * time.Millisecond})
	l.waitServed(t, 1, 200) // every client has its connection to generation 1
	// A worker without the library: it never announces ACCEPT.
	writeScript(t, script, "exec env -u UPGRADER_HANDOFF_FD "+helloBin)
	p.upgradeTo(2)
	l.waitServed(t, 2, 100)
	r := l.stop()
	requireNoFailures(t, r)
	if r.ServerCloses < 16 || r.ClosedUnderClient != 0 || r.IdleClosed != 0 {
		t.Fatalf("%d polite closes, %d under the client; want every connection closed politely", r.ServerCloses, r.ClosedUnderClient)
	}
	if st := p.status(); st.Handoffs.HandedOff != 0 || st.Handoffs.Refused == 0 {
		t.Fatalf("handoff counts %+v; want refusals and nothing handed off", st.Handoffs)
	}
}

func TestPythonWorkerTakesHandedOffConnections(t *testing.T) {
	p, script, addr := startScripted(t, "exec "+helloBin)
	l := startLoad(loadgen.Config{Addr: addr, Clients: 8, Mode: loadgen.KeepAlive, MaxIdle: 50 * time.Millisecond})
	l.waitServed(t, 1, 100) // every client has its connection to generation 1
	writeScript(t, script, "exec python3 "+filepath.Join(repoRoot, "examples/python/worker.py"))
	p.upgradeTo(2)
	l.waitServed(t, 2, 100)
	r := l.stop()
	requireNoFailures(t, r)
	st := p.status()
	if st.Handoffs.HandedOff == 0 || r.Generations["2"] == 0 || r.ConnsAcrossGenerations == 0 {
		t.Fatalf("handoffs %+v, generations %v, %d connections across generations: the Python worker took none",
			st.Handoffs, r.Generations, r.ConnsAcrossGenerations)
	}
}

func TestMalformedHandoffMessageIsRefused(t *testing.T) {
	// The worker (python, exec'd by the shim) writes garbage on its handoff
	// channel, then serves normally.
	py := `import os, socket, time
ch = socket.socket(fileno=int(os.environ["UPGRADER_HANDOFF_FD"]))
ch.send(b"UPGRADER/1 HANDOFF id=1 kind=http n=3\nstate=x\n")
ch.send(b"\x00\xff garbage")
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(os.environ["NOTIFY_SOCKET"])
s.send(b"READY=1")
time.sleep(60)`
	p := startUpgrader(t, "--", "python3", "-c", py)
	p.waitReady(1)
	p.waitStatus(5*time.Second, "two malformed handoff messages counted", func(st supervise.Status) bool {
		return st.Handoffs.Malformed >= 2
	})
	if st := p.status(); st.Handoffs.Malformed != 2 || !st.Ready {
		t.Fatalf("status %+v", st)
	}
}

func TestPipelinedRequestsAtDrainAreNotLost(t *testing.T) {
	p, c, br := helloConn(t)
	// Two requests in one write: the second sits in the old worker's
	// buffer while the first is in flight when the drain begins.
	req := "POST /?sleep=500ms HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi" +
		"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
	if _, err := c.Write([]byte(req)); err != nil {
		t.Fatal(err)
	}
	waitConsumed(t, c, p.workerPids(1)[0]) // both requests are in the worker
	p.signal(syscall.SIGUSR2)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	for i := 1; i <= 2; i++ {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("pipelined response %d: %v", i, err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.Header.Get("X-Generation") != "1" {
			t.Fatalf("pipelined response %d: %d from generation %s; want 200 from 1", i, resp.StatusCode, resp.Header.Get("X-Generation"))
		}
	}
	p.waitExited(1)
	if code, gen, _ := rawPost(t, c, br); code != 200 || gen != "2" {
		t.Fatalf("next request: %d from generation %s, want generation 2", code, gen)
	}
}
