package integration

import (
	"bufio"
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
	"github.com/seed6cb0314a/upgrader/internal/sockets"
	"github.com/seed6cb0314a/upgrader/supervise"
)

// TestStopRefusesOnceTheLastWorkerStopsListening: during a graceful stop,
// once the last worker has closed its listener, a new connection is
// refused at once (a client or balancer retries that safely), not queued
// behind upgrader's own copy of the listener and reset when upgrader
// exits, its request already sent. The request in flight still completes.
func TestStopRefusesOnceTheLastWorkerStopsListening(t *testing.T) {
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--drain-timeout", "30s", "--", helloBin)
	addr := p.addr("")
	p.waitReady(1)
	worker := p.workerPids(1)[0]

	// A request the worker holds for 2s keeps it draining, and upgrader
	// running, after it has closed its listener.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("GET /?sleep=2s HTTP/1.1\r\nHost: x\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	waitConsumed(t, c, worker)

	p.signal(syscall.SIGTERM)
	waitNotListening(t, worker)
	if l := listeningAddrs(p.pid); len(l) > 0 {
		t.Fatalf("upgrader still listens on %v while its last worker drains", l)
	}
	late, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err == nil {
		late.Close()
		t.Fatalf("a connection to %s during the stop's drain was accepted by the kernel, to be reset at exit; want it refused", addr)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("a connection to %s during the stop's drain: %v, want ECONNREFUSED", addr, err)
	}

	c.SetDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("the request in flight at the stop: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("the request in flight at the stop: status %d, want 200", resp.StatusCode)
	}
	// The connection, idle now and with nowhere to go, is closed after the
	// drain's idle grace, so that upgrader exits well before any timeout.
	if code := p.wait(10 * time.Second); code != 0 {
		t.Fatalf("upgrader exited %d after a graceful stop, want 0", code)
	}
}

// TestStopWithoutBalancerLosesNothing: a graceful stop with no balancer
// in front, under 16 clients that open a new connection per request,
// fails none of them: upgrader's listener stops taking new connections
// (its SYNs dropped, refused once the socket is gone: safe to retry) and
// the drain begins only once the workers have accepted what the queue
// held, so that no connection is reset at the close. Without the filter
// some 5 to 8 requests fail per stop (BenchmarkGracefulStop).
func TestStopWithoutBalancerLosesNothing(t *testing.T) {
	const stops = 3
	for i := range stops {
		p := startUpgrader(t, "-l", "127.0.0.1:0", "--", helloBin)
		p.waitReady(1)
		l := startLoad(loadgen.Config{Addr: p.addr(""), Clients: 16, Mode: loadgen.NewConn, Timeout: 5 * time.Second})
		l.waitServed(t, 1, 500)
		if code := p.stop(syscall.SIGTERM, 30*time.Second); code != 0 {
			t.Fatalf("stop %d: upgrader exited %d after TERM, want 0", i+1, code)
		}
		r := l.stop()
		t.Logf("stop %d: %s", i+1, r)
		if failed := r.Failed() - r.Counts[loadgen.Refused]; failed != 0 {
			t.Fatalf("stop %d: %d requests failed other than by a refused connection, want 0: %s", i+1, failed, r)
		}
	}
}

// TestStopAfterSelfUpgradeLosesNothing: the --listen socket carried
// across a self-upgrade is still upgrader's own, so the stop that follows
// filters it and waits for its queue as before.
func TestStopAfterSelfUpgradeLosesNothing(t *testing.T) {
	v2 := upgraderV2(t)
	p, bin := startSelfUpgradable(t, "-l", "127.0.0.1:0", "--", helloBin)
	p.waitReady(1)
	installBin(t, v2, bin)
	if out, err := p.selfUpgrade(true); err != nil {
		t.Fatalf("self-upgrade: %v\n%s", err, out)
	}
	l := startLoad(loadgen.Config{Addr: p.addr(""), Clients: 16, Mode: loadgen.NewConn, Timeout: 5 * time.Second})
	l.waitServed(t, 1, 500)
	if code := p.stop(syscall.SIGTERM, 30*time.Second); code != 0 {
		t.Fatalf("upgrader exited %d after TERM, want 0", code)
	}
	r := l.stop()
	t.Logf("load: %s", r)
	if failed := r.Failed() - r.Counts[loadgen.Refused]; failed != 0 {
		t.Fatalf("%d requests failed other than by a refused connection, want 0: %s", failed, r)
	}
	p.expectLogged(5*time.Second, "the stop's wait for the carried listener's queue", func(m map[string]any) bool {
		_, waited := m["waited"]
		return waited && m["listeners"] == float64(1)
	})
}

// TestStopWaitsForHandshakesUnderWay: a handshake the listener has
// answered but whose final ACK has not come yet when the stop begins (a
// distant client; here held in SYN_RECV by TCP_DEFER_ACCEPT until its
// client sends its request) is waited for: it completes through the
// filter, the worker accepts and answers it, and only then the drain
// begins. Without the wait it would be dropped with the listener.
func TestStopWaitsForHandshakesUnderWay(t *testing.T) {
	l, f := plainListener(t)
	if err := syscall.SetsockoptInt(int(f.Fd()), syscall.IPPROTO_TCP, syscall.TCP_DEFER_ACCEPT, 30); err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	p := startActivated(t, []*os.File{f}, []string{"web"}, "--listen", "web="+addr, "--", helloBin)
	p.waitReady(1)
	c, err := net.Dial("tcp", addr) // established for the client, SYN_RECV for the listener
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	p.signal(syscall.SIGTERM)
	p.expectLogged(5*time.Second, "the stop's wait for a handshake under way", func(m map[string]any) bool {
		return m["handshakes"] == float64(1) && m["queued"] == nil
	})
	if _, err := c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("the request on the handshake under way at the stop: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("the request on the handshake under way at the stop: status %d, want 200", resp.StatusCode)
	}
	if code := p.wait(10 * time.Second); code != 0 {
		t.Fatalf("upgrader exited %d after a graceful stop, want 0", code)
	}
}

// plainListener binds a loopback plain-TCP listener, as upgrader binds
// its own (an MPTCP one, Go's default, takes no filter), and returns it
// and a file of its fd, both closed at the test's end.
func plainListener(t *testing.T) (net.Listener, *os.File) {
	t.Helper()
	lc := net.ListenConfig{}
	lc.SetMultipathTCP(false)
	l, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	f, err := l.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return l, f
}

// TestAdoptedListenerLosesAStopsFilter: a listener that a stop filtered
// (upgrader stopped, or crashed, while it drained, and systemd's fd store
// kept the socket) takes new connections again once the next upgrader
// adopts it for its --listen value.
func TestAdoptedListenerLosesAStopsFilter(t *testing.T) {
	l, f := plainListener(t)
	addr := l.Addr().String()
	if err := sockets.RefuseNewConnections(int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	if c, err := net.DialTimeout("tcp", addr, 300*time.Millisecond); err == nil {
		c.Close()
		t.Fatal("the filtered listener took a new connection before the adoption")
	}
	p := startActivated(t, []*os.File{f}, []string{"web"}, "--listen", "web="+addr, "--", helloBin)
	p.waitReady(1)
	if code, body, err := get("http://" + addr + "/"); err != nil || code != 200 {
		t.Fatalf("GET on the adopted listener a stop had filtered: %d %q %v, want 200", code, body, err)
	}
}

// TestPreStopServesTheShutdownDelayOnce: `upgrader prestop` (a Kubernetes
// preStop hook) turns /readyz to 503 at once while the workers go on
// serving, and returns once --shutdown-delay has passed; the TERM that
// follows drains at once instead of waiting the delay again.
func TestPreStopServesTheShutdownDelayOnce(t *testing.T) {
	const delay = 1500 * time.Millisecond
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--health", "127.0.0.1:0", "--shutdown-delay", delay.String(), "--", helloBin)
	addr := p.addr("")
	readyz := "http://" + p.healthAddr() + "/readyz"
	p.waitReady(1)
	stopLoad := runLoad(loadgen.Config{Addr: addr, Clients: 8, Mode: loadgen.NewConn})

	type cliResult struct {
		out  string
		code int
	}
	res := make(chan cliResult, 1)
	start := time.Now()
	go func() {
		out, err := exec.Command(upgraderBin, "prestop", "--control", p.control).CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			code = -1
		}
		res <- cliResult{string(out), code}
	}()
	st := p.waitStatus(5*time.Second, "not ready after prestop", func(st supervise.Status) bool { return !st.Ready })
	if st.Stopping || !strings.Contains(st.NotReady, "prestop") {
		t.Fatalf("status after prestop: stopping %v, not ready %q; want not stopping, not ready because of prestop", st.Stopping, st.NotReady)
	}
	if code, body, err := get(readyz); err != nil || code != 503 {
		t.Fatalf("/readyz during prestop: %d %q %v, want 503", code, body, err)
	}
	r := <-res
	if r.code != 0 || !strings.Contains(r.out, "shutdown delay over") {
		t.Fatalf("upgrader prestop: exit %d, output %q; want 0 once the delay is over", r.code, r.out)
	}
	if waited := time.Since(start); waited < delay {
		t.Fatalf("upgrader prestop returned after %s, before --shutdown-delay %s", waited, delay)
	}
	if g := genOf(p.status(), 1); g == nil || g.State != supervise.GenActive {
		t.Fatalf("generation 1 after prestop: %+v, want still active and serving", g)
	}
	requireNoFailures(t, stopLoad())

	p.signal(syscall.SIGTERM)
	// beginStop drains in the same turn of the loop that takes the TERM:
	// the delay was served by prestop. The first status that says
	// stopping shows generation 1 draining, or gone; or the stop is over
	// before a status could be read (it did not wait the delay again).
	deadline := time.Now().Add(5 * time.Second)
	for stopped := false; !stopped; {
		select {
		case <-p.done:
			stopped = true
			continue
		default:
		}
		if st, err := p.tryStatus(); err == nil && st.Stopping {
			if g := genOf(st, 1); g != nil && g.State != supervise.GenDraining {
				t.Fatalf("generation 1 once stopping after prestop: %s, want draining at once", g.State)
			}
			stopped = true
			continue
		}
		if time.Now().After(deadline) {
			t.Fatal("not stopping within 5s of the TERM")
		}
		time.Sleep(5 * time.Millisecond) // polling interval, not synchronization
	}
	if code := p.wait(10 * time.Second); code != 0 {
		t.Fatalf("upgrader exited %d, want 0", code)
	}
}

// BenchmarkGracefulStop measures what a graceful stop without a balancer
// in front costs 16 clients that open a new connection per request: the
// requests that fail (reset, EOF, timeout: connections the kernel had
// queued when the last listener copy closed) and those refused (safe to
// retry), per stop.
//
//	go test -run '^$' -bench GracefulStop -benchtime 20x ./integration
func BenchmarkGracefulStop(b *testing.B) {
	var failed, refused, ok int
	for range b.N {
		p := startUpgrader(b, "-l", "127.0.0.1:0", "--", helloBin)
		p.waitReady(1)
		l := startLoad(loadgen.Config{Addr: p.addr(""), Clients: 16, Mode: loadgen.NewConn, Timeout: 2 * time.Second})
		l.waitServed(b, 1, 2000)
		if code := p.stop(syscall.SIGTERM, 30*time.Second); code != 0 {
			b.Fatalf("upgrader exited %d after TERM, want 0", code)
		}
		r := l.stop()
		refused += r.Counts[loadgen.Refused]
		ok += r.Counts[loadgen.OK]
		failed += r.Failed() - r.Counts[loadgen.Refused]
	}
	b.ReportMetric(float64(failed)/float64(b.N), "failed/stop")
	b.ReportMetric(float64(refused)/float64(b.N), "refused/stop")
	b.ReportMetric(float64(ok)/float64(b.N), "ok/stop")
}
