package integration

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// BenchmarkNodeHandoff10k is BenchmarkHandoff10k with Node.js workers:
// upgrader --ipc node running examples/node/server.js (the nodejs/
// module), one worker per generation. 10,000 keep-alive connections each
// have one request answered by generation 1 and stay idle; a USR2 then
// starts generation 2, and generation 1's worker sends every connection
// over Node's IPC channel to upgrader, which passes it to generation 2's
// worker. Measured from the USR2 until generation 1's worker has exited,
// split at generation 2's "generation ready" and generation 1's "draining
// generation" (upgrader's log times); then every connection sends a
// request and must be answered by generation 2 on the same connection.
//
//	go test -run '^$' -bench NodeHandoff10k -benchtime 1x ./integration
func BenchmarkNodeHandoff10k(b *testing.B) {
	const n = 10000
	raiseNofile(b, n+1000) // per process: the test, and each worker, holds n
	for i := 0; i < b.N; i++ {
		p := startUpgrader(b, "--ipc", "node", "-l", "127.0.0.1:0", "--",
			"node", filepath.Join(repoRoot, "examples", "node", "server.js"))
		addr := p.addr("")
		p.waitReady(1)
		old := p.workerPids(1)
		if len(old) != 1 {
			b.Fatalf("generation 1 workers %v, want one", old)
		}
		// What a worker's start-up costs, to set against the new worker's
		// CPU time, which includes its own.
		startupCPU := cpuTime(b, old[0])
		conns, readers := openAnswered(b, addr, n, "1")
		supBefore := rssKiB(b, p.pid)
		supCPU, oldCPU := cpuTime(b, p.pid), cpuTime(b, old[0])

		t0 := time.Now()
		p.signal(syscall.SIGUSR2)
		peak := watchUntilExit(old[0], 2*time.Minute)
		if peak.exited.IsZero() {
			b.Fatalf("generation 1 worker %d still running 2 minutes after USR2", old[0])
		}
		total := peak.exited.Sub(t0)
		supCPU = cpuTime(b, p.pid) - supCPU
		next := p.workerPids(2)
		if len(next) != 1 {
			b.Fatalf("generation 2 workers %v, want one", next)
		}
		newCPU := cpuTime(b, next[0])
		ready := logTime(p, "generation ready", 2)
		draining := logTime(p, "draining generation", 1)

		// Every connection is alive and now served by generation 2.
		failed := 0
		var firstErr error
		for j, c := range conns {
			if gen, err := post(c, readers[j]); err != nil || gen != "2" {
				if firstErr == nil {
					firstErr = fmt.Errorf("connection %d: generation %q, %v", j, gen, err)
				}
				failed++
			}
		}
		if failed > 0 {
			b.Fatalf("%d of %d connections failed after the handoff; first: %v", failed, n, firstErr)
		}
		st := p.status()
		b.ReportMetric(float64(total.Microseconds())/1000, "ms-USR2-to-old-exit")
		b.ReportMetric(float64(ready.Sub(t0).Microseconds())/1000, "ms-USR2-to-new-ready")
		b.ReportMetric(float64(peak.exited.Sub(draining).Microseconds())/1000, "ms-drain-to-old-exit")
		b.ReportMetric(float64(st.Handoffs.HandedOff), "handed-off")
		b.ReportMetric(float64(supBefore), "KiB-upgrader-RSS-before")
		b.ReportMetric(float64(procStatusKiB(b, p.pid, "VmHWM")), "KiB-upgrader-peak-RSS")
		b.ReportMetric(float64(peak.rss), "KiB-old-worker-peak-RSS")
		b.ReportMetric(float64(rssKiB(b, next[0])), "KiB-new-worker-RSS")
		// Where the time goes: CPU from the USR2 until the old worker
		// exited, by process.
		ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
		b.ReportMetric(ms(supCPU), "ms-CPU-upgrader")
		b.ReportMetric(ms(peak.cpu-oldCPU), "ms-CPU-old-worker")
		b.ReportMetric(ms(newCPU), "ms-CPU-new-worker-incl-startup")
		b.ReportMetric(ms(startupCPU), "ms-CPU-worker-startup")
		for _, c := range conns {
			c.Close()
		}
		p.stop(syscall.SIGTERM, time.Minute)
	}
}

// raiseNofile raises this process's soft RLIMIT_NOFILE to its hard limit,
// which must be at least want: set explicitly, it is inherited by upgrader
// and from upgrader by its workers, where the limit Go raises by itself at
// start-up is not.
func raiseNofile(b *testing.B, want uint64) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		b.Fatal(err)
	}
	if rl.Max < want {
		b.Fatalf("RLIMIT_NOFILE hard limit %d: want at least %d", rl.Max, want)
	}
	rl.Cur = rl.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		b.Fatalf("setrlimit NOFILE %d: %v", rl.Cur, err)
	}
}

// openAnswered opens n keep-alive connections to addr, 100 at a time,
// each with one request answered by generation gen (openAnsweredFrom,
// from any local address).
func openAnswered(b *testing.B, addr string, n int, gen string) ([]net.Conn, []*bufio.Reader) {
	conns, readers, err := openAnsweredFrom(addr, "", n, gen)
	if err != nil {
		b.Fatal(err)
	}
	return conns, readers
}

// exitWatch is what watchUntilExit saw of a process.
type exitWatch struct {
	rss    int           // the highest VmHWM read, KiB
	cpu    time.Duration // its CPU time (user and system) at the last read
	exited time.Time     // when it was first seen exited (a zombie or gone); zero: not within the time
}

// watchUntilExit reads /proc/PID/status every millisecond until pid has
// exited: its peak RSS (VmHWM, the kernel's own high-water mark, so the
// peak between two reads is not missed) and when it exited.
func watchUntilExit(pid int, timeout time.Duration) exitWatch {
	var w exitWatch
	path := fmt.Sprintf("/proc/%d/status", pid)
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		data, err := os.ReadFile(path)
		zombie := false
		for _, line := range strings.Split(string(data), "\n") {
			if v, ok := strings.CutPrefix(line, "State:"); ok && strings.HasPrefix(strings.TrimSpace(v), "Z") {
				zombie = true
			}
			if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
				if f := strings.Fields(v); len(f) > 0 {
					k, _ := strconv.Atoi(f[0])
					w.rss = max(w.rss, k)
				}
			}
		}
		if err != nil || zombie {
			w.exited = time.Now()
			return w
		}
		if c, ok := readCPU(pid); ok {
			w.cpu = c
		}
	}
	return w
}

// clockTick is USER_HZ, the unit of /proc/PID/stat's times: 100 on every
// Linux architecture Go runs on.
const clockTick = 10 * time.Millisecond

// readCPU returns pid's user and system time from /proc/PID/stat (proc(5)).
func readCPU(pid int) (time.Duration, bool) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, false
	}
	// The command name is in parentheses and may hold spaces; utime and
	// stime are fields 14 and 15, the 12th and 13th after it.
	i := strings.LastIndexByte(string(data), ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 13 {
		return 0, false
	}
	u, err1 := strconv.Atoi(f[11])
	st, err2 := strconv.Atoi(f[12])
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return time.Duration(u+st) * clockTick, true
}

func cpuTime(b *testing.B, pid int) time.Duration {
	c, ok := readCPU(pid)
	if !ok {
		b.Fatalf("no CPU time in /proc/%d/stat", pid)
	}
	return c
}

// logTime returns the time of upgrader's log entry msg about generation
// gen, which has already been logged by the time this is called.
func logTime(p *proc, msg string, gen int) time.Time {
	e := p.expectLogged(10*time.Second, fmt.Sprintf("%q of generation %d", msg, gen), func(m map[string]any) bool {
		return m["msg"] == msg && m["generation"] == float64(gen)
	})
	ts, ok := e["ts"].(float64)
	if !ok {
		p.t.Fatalf("log entry %v: no ts", e)
	}
	sec := int64(ts)
	return time.Unix(sec, int64((ts-float64(sec))*1e9))
}
