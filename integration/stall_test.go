package integration

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// stallWorker takes handoffs (ACCEPT), says it is ready, and never reads
// its handoff channel again.
const stallWorker = `
import os, socket, time
ch = socket.socket(fileno=int(os.environ["UPGRADER_HANDOFF_FD"]))
ch.send(b"UPGRADER/1 ACCEPT kinds=http\n")
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.connect(os.environ["NOTIFY_SOCKET"])
    s.sendall(b"READY=1")
while True:
    time.sleep(3600)
`

// openIdle opens n keep-alive connections to addr, each answered once, and
// leaves them idle.
func openIdle(t testing.TB, addr string, n int) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	sem := make(chan struct{}, 64)
	for i := range conns {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := net.Dial("tcp", addr)
			if err != nil {
				errs <- err
				return
			}
			conns[i] = c
			fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				errs <- err
				return
			}
			resp.Body.Close()
		}()
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	})
	select {
	case err := <-errs:
		t.Fatalf("opening %d idle connections: %v", n, err)
	default:
	}
	return conns
}

// stalledHandoff upgrades a generation holding conns idle keep-alive
// connections to a worker that never reads its handoff channel, probing
// /livez and status throughout; it returns the slowest answer of each, and
// the supervisor's peak RSS.
func stalledHandoff(t testing.TB, conns int) (livezMax, statusMax time.Duration, rss int) {
	dir := t.TempDir()
	script, stall := filepath.Join(dir, "run"), filepath.Join(dir, "stall.py")
	if err := os.WriteFile(stall, []byte(stallWorker), 0o644); err != nil {
		t.Fatal(err)
	}
	writeScript(t, script, "exec "+helloBin)
	const drainTimeout = 3 * time.Second
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--health", "127.0.0.1:0", "--drain-timeout", drainTimeout.String(), "--", script)
	addr := p.addr("")
	p.waitReady(1)
	livez := "http://" + p.healthAddr() + "/livez"
	openIdle(t, addr, conns)
	writeScript(t, script, "exec python3 "+stall)

	ctx, cancel := context.WithCancel(context.Background())
	var failures atomic.Int64
	var probeErr atomic.Value
	var mu sync.Mutex
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			t0 := time.Now()
			code, _, err := get(livez)
			d := time.Since(t0)
			if err != nil || code != 200 {
				failures.Add(1)
				probeErr.Store(fmt.Sprintf("/livez %d %v", code, err))
			}
			t0 = time.Now()
			_, serr := p.tryStatus()
			sd := time.Since(t0)
			if serr != nil {
				failures.Add(1)
				probeErr.Store(fmt.Sprintf("status: %v", serr))
			}
			mu.Lock()
			livezMax, statusMax = max(livezMax, d), max(statusMax, sd)
			mu.Unlock()
			time.Sleep(10 * time.Millisecond) // probe interval
		}
	}()
	p.signal(syscall.SIGUSR2)
	p.waitReady(2)
	st := p.waitExited(1)
	cancel()
	<-done
	rss = procStatusKiB(t, p.pid, "VmHWM") // the peak
	if n := failures.Load(); n > 0 {
		t.Fatalf("%d probes failed while the handoff target stalled; last: %v", n, probeErr.Load())
	}
	if st.Handoffs.HandedOff != 0 {
		t.Fatalf("handoffs %+v: a worker that never reads took connections", st.Handoffs)
	}
	stopped := time.Now()
	if code := p.stop(syscall.SIGTERM, drainTimeout+5*time.Second); code != 0 {
		t.Fatalf("graceful stop exited %d", code)
	}
	t.Logf("%d idle connections, target never reads: /livez slowest %s, status slowest %s, TERM took %s, peak RSS %d KiB, handoffs %+v",
		conns, livezMax, statusMax, time.Since(stopped).Round(time.Millisecond), rss, st.Handoffs)
	return livezMax, statusMax, rss
}

// A worker that takes handoffs and then never reads its channel: the
// supervisor stays live and answers throughout, refuses the batches back
// to their sender, and stops within the drain timeout.
func TestStalledHandoffTargetKeepsSupervisorLive(t *testing.T) {
	stalledHandoff(t, 4000)
}

// BenchmarkStalledHandoffTarget reports the figures of the stalled target
// with 4,000 idle connections:
//
//	go test -run '^$' -bench StalledHandoff -benchtime 1x ./integration
func BenchmarkStalledHandoffTarget(b *testing.B) {
	for i := 0; i < b.N; i++ {
		l, s, rss := stalledHandoff(b, 4000)
		b.ReportMetric(float64(l.Microseconds())/1000, "livez-max-ms")
		b.ReportMetric(float64(s.Microseconds())/1000, "status-max-ms")
		b.ReportMetric(float64(rss)/1024, "peak-rss-MiB")
	}
}
