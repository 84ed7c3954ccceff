package integration

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// BenchmarkHandoff100k hands 100,000 idle keep-alive connections from one
// examples/hello worker to the next: each connection has one request
// answered by generation 1 and stays idle, a USR2 starts generation 2, and
// generation 1 hands every connection over; then every one sends a
// request and must be answered by generation 2 on the same connection.
//
// One client address gives about 28,000 connections to one server address
// (net.ipv4.ip_local_port_range, 32768-60999 by default), so the clients
// bind 127.0.0.1 to 127.0.0.4 in turn (all of 127/8 is loopback on Linux):
// no network namespace is needed. Each of this process, the old worker and
// the new one holds 100,000 fds: the benchmark raises its own
// RLIMIT_NOFILE, hard and soft, to 250,000 (root's CAP_SYS_RESOURCE; the
// kernel's fs.nr_open bounds it), which upgrader and its workers inherit.
// docs/scale.md says what a deployment must raise.
//
// It reports the time from the USR2 until the old worker exited, from the
// drain signal until then, upgrader's RSS before and at its peak (VmHWM),
// the old worker's peak and the new worker's RSS holding the 100,000.
//
//	go test -run '^$' -bench 'BenchmarkHandoff100k$' -benchtime 1x -timeout 20m ./integration
func BenchmarkHandoff100k(b *testing.B) {
	const n = 100000
	setNofile(b, 250000)
	for i := 0; i < b.N; i++ {
		p := startUpgrader(b, "-l", "127.0.0.1:0", "--", helloBin)
		addr := p.addr("")
		p.waitReady(1)
		old := p.workerPids(1)
		if len(old) != 1 {
			b.Fatalf("generation 1 workers %v, want one", old)
		}
		opened := time.Now()
		conns, readers := openAnsweredFrom(b, addr, n, "1", []string{"127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"})
		b.Logf("%d connections open and answered in %s", n, time.Since(opened).Round(time.Millisecond))
		supBefore := rssKiB(b, p.pid)

		t0 := time.Now()
		p.signal(syscall.SIGUSR2)
		peak := watchUntilExit(old[0], 5*time.Minute)
		if peak.exited.IsZero() {
			b.Fatalf("generation 1 worker %d still running 5 minutes after USR2", old[0])
		}
		next := p.workerPids(2)
		if len(next) != 1 {
			b.Fatalf("generation 2 workers %v, want one", next)
		}
		ready := logTime(p, "generation ready", 2)
		draining := logTime(p, "draining generation", 1)

		failed := 0
		var firstErr error
		var mu sync.Mutex
		parallel(n, 200, func(j int) {
			if gen, err := post(conns[j], readers[j]); err != nil || gen != "2" {
				mu.Lock()
				if firstErr == nil {
					firstErr = fmt.Errorf("connection %d: generation %q, %v", j, gen, err)
				}
				failed++
				mu.Unlock()
			}
		})
		if failed > 0 {
			b.Fatalf("%d of %d connections failed after the handoff; first: %v", failed, n, firstErr)
		}
		st := p.status()
		ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
		b.ReportMetric(ms(peak.exited.Sub(t0)), "ms-USR2-to-old-exit")
		b.ReportMetric(ms(ready.Sub(t0)), "ms-USR2-to-new-ready")
		b.ReportMetric(ms(peak.exited.Sub(draining)), "ms-drain-to-old-exit")
		b.ReportMetric(float64(st.Handoffs.HandedOff), "handed-off")
		b.ReportMetric(float64(supBefore)/1024, "MiB-upgrader-RSS-before")
		b.ReportMetric(float64(procStatusKiB(b, p.pid, "VmHWM"))/1024, "MiB-upgrader-peak-RSS")
		b.ReportMetric(float64(peak.rss)/1024, "MiB-old-worker-peak-RSS")
		b.ReportMetric(float64(rssKiB(b, next[0]))/1024, "MiB-new-worker-RSS")
		parallel(n, 200, func(j int) { conns[j].Close() })
		p.stop(syscall.SIGTERM, time.Minute)
	}
}

// setNofile sets this process's RLIMIT_NOFILE, soft and hard, to want,
// raising the hard limit if need be (CAP_SYS_RESOURCE), within
// fs.nr_open.
func setNofile(b *testing.B, want uint64) {
	if raw, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
		if max, err := strconv.ParseUint(strings.TrimSpace(string(raw)), 10, 64); err == nil && max < want {
			b.Fatalf("fs.nr_open is %d: want at least %d", max, want)
		}
	}
	rl := syscall.Rlimit{Cur: want, Max: want}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		b.Fatalf("setrlimit NOFILE %d: %v (raising the hard limit needs CAP_SYS_RESOURCE)", want, err)
	}
}

// openAnsweredFrom is openAnswered with the clients bound to the source
// addresses in turn, 200 at a time.
func openAnsweredFrom(b *testing.B, addr string, n int, gen string, sources []string) ([]net.Conn, []*bufio.Reader) {
	conns := make([]net.Conn, n)
	readers := make([]*bufio.Reader, n)
	var mu sync.Mutex
	var first error
	parallel(n, 200, func(j int) {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(sources[j%len(sources)])}, Timeout: 30 * time.Second}
		c, err := d.Dial("tcp", addr)
		if err == nil {
			conns[j], readers[j] = c, bufio.NewReader(c)
			var g string
			if g, err = post(c, readers[j]); err == nil && g != gen {
				err = fmt.Errorf("answered by generation %q, want %s", g, gen)
			}
		}
		if err != nil {
			mu.Lock()
			if first == nil {
				first = fmt.Errorf("connection %d: %w", j, err)
			}
			mu.Unlock()
		}
	})
	if first != nil {
		b.Fatal(first)
	}
	return conns, readers
}

// parallel runs do(0) … do(n-1) on workers goroutines.
func parallel(n, workers int, do func(int)) {
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := w; j < n; j += workers {
				do(j)
			}
		}()
	}
	wg.Wait()
}
